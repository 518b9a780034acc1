#!/usr/bin/env bash
# Bertrand et al.'s self-consuming diffusion experiment at CPU scale (8x8 digits), about 30 min on 2 cores.
#   1. generation 0: a diffusion model pretrained on the real digits
#   2. four regimes fine-tuned from it for 4 generations: fully synthetic, lambda = 0, 0.5, 1
#   3. figures/digits_stability.png and figures/digits_summary.md from the run directories alone
set -euo pipefail
cd "$(dirname "$0")/../.."
simulate experiment=digits_pretrain "$@"
simulate experiment=digits "$@"
simulate-report runs/digits --metric fid --metric bpd_bound --out runs/digits/figures
cp runs/digits/figures/stability.png figures/digits_stability.png
cp runs/digits/figures/summary.md figures/digits_summary.md
