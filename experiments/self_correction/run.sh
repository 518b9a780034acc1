#!/usr/bin/env bash
# Gillman et al. (ICML 2024), self-correcting self-consuming loops, at CPU scale (about 7 minutes of CPU,
# 39 minutes of wall time on the loaded 2-core machine; the digits part is most of it):
#   1. the Gaussian toy: the idealised correction (a truth draw with probability gamma/(1+gamma)) under
#      replace and mix, gamma in {0, 0.01, 0.03, 0.1, 0.3, 1, 2, 5}, 1000 chains x 3 seeds, 50 fits
#   2. digits: a class-conditional diffusion pretrained on 500 real digits, then 2 generations of
#      fine-tuning on real + lambda n of its samples, lambda in {0.5, 1.5}, with and without the k-means
#      correction (16 centroids per class), 3 seeds
#   3. figures/self_correction_gaussian.png, self_correction_digits.png, self_correction.md
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=self_correction_gaussian run_root="$RUNS"
simulate experiment=self_correction_digits_pretrain run_root="$RUNS" progress=false threads=1
START=()  # generation 0 of every digits run: the pretrained model (its config's default path under runs/)
[ "$RUNS" = runs ] || START=(init.checkpoint="$RUNS/self_correction_digits_pretrain/base/gen_000/model.pt")
simulate experiment=self_correction_digits run_root="$RUNS" progress=false threads=1 "${START[@]}"
python experiments/self_correction/analyze.py --runs "$RUNS" --out figures
