#!/usr/bin/env bash
# SIMS (Alemohammad et al. 2024) in the synthetic augmentation loop at CPU scale (8x8 digits, tiny
# diffusion model): 2 regimes (standard, SIMS omega = 1) x 2 pollution levels (|D_p| = 0.2 and 1.0 x
# |D_r|) x 3 seeds: generation 0 (the pretrained model, with or without its auxiliary model) and
# generation 1 (fine-tuned on the polluted set), ~2 minutes a run on one core.
#   1. experiment=digits_pretrain (shared with experiments/digits and experiments/neon), when missing
#   2. experiment=sims_digits
#   3. figures/sims_digits.png and figures/sims.md from the run directories
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f runs/digits_pretrain/base/gen_000/model.pt ] || simulate experiment=digits_pretrain "$@"
simulate experiment=sims_digits "$@"
python experiments/sims/analyze.py
