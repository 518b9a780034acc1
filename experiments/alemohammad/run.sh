#!/usr/bin/env bash
# Alemohammad et al. (ICLR 2024, MAD), one command (about 10 minutes on 2 loaded CPU cores):
#   1. sampling bias: a 2-D Gaussian refitted on samples drawn at temperature s = 1, 0.9, 0.7
#   2. two generation-0 models of the 25-mode GMM: fitted (EM from k-means) and deliberately bad
#   3. the 25-mode GMM under fully synthetic (replace), synthetic augmentation (mix lambda = 1,
#      accumulate) and fresh-data loops, the last from both starts
#   4. figures/alemohammad.png and figures/alemohammad.md from the run directories alone
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=alemohammad_bias run_root="$RUNS"
[ -f "$RUNS/alemohammad/inits/bad.pt" ] || python experiments/alemohammad/make_inits.py "$RUNS/alemohammad/inits"
simulate experiment=alemohammad_gmm run_root="$RUNS"
simulate experiment=alemohammad_fresh run_root="$RUNS"
python experiments/alemohammad/analyze.py --runs "$RUNS" --out figures
