#!/usr/bin/env bash
# Feng et al. (2024), verification of synthetic data, at CPU scale (about 9 minutes of CPU with the shared
# pretraining, 35 minutes of wall time on the loaded 2-core machine):
#   1. the theory: a two-class Gaussian mixture with labels wrong at rate p, an oracle verifier of set error
#      rates, a linear classifier fitted to what it keeps (simulator.verification on 300 chains x 3 seeds),
#      swept across Feng et al.'s breakdown p_* = 1/2 (computed by analyze.py)
#   2. digits: the class-conditional diffusion of experiment=self_correction_digits_pretrain retrained on
#      its own samples with labels wrong at rate 0.3, no verifier / a good one / a bad one / clean labels
#   3. figures/verification_toy.png, verification_digits.png, verification.md
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
START=()  # generation 0: the pretrained class-conditional model (its config's default path under runs/)
[ "$RUNS" = runs ] || START=(init.checkpoint="$RUNS/self_correction_digits_pretrain/base/gen_000/model.pt")
simulate experiment=self_correction_digits_pretrain run_root="$RUNS" progress=false threads=1
V=(experiment=verification_digits run_root="$RUNS" progress=false threads=1 "${START[@]}")
simulate "${V[@]}"
simulate "${V[@]}" sample.verifier=oracle sample.curation_k=2 +sample.verifier_options.keep_correct=0.9 +sample.verifier_options.keep_wrong=0.1
simulate "${V[@]}" sample.verifier=oracle sample.curation_k=2 +sample.verifier_options.keep_correct=0.3 +sample.verifier_options.keep_wrong=0.9
simulate "${V[@]}" sample.label_noise=0
python experiments/verification/analyze.py --runs "$RUNS" --out figures
