#!/usr/bin/env bash
# Model collapse in linear regression, one command (about 4 minutes on 2 loaded CPU cores):
#   1. Gerstgrasser et al. (2024): OLS relabelled by its previous fit on one fixed design (d = 10, n = 50),
#      replace, accumulate, mix (lambda = 1) and real_only, 21 fits, 1,000 chains
#   2. Dey & Donoho (2024): the same in a random design (new covariates from the fitted Gaussian every
#      generation, n = 200), accumulate (augment) against replace (discard), 1,000 chains
#   3. Dohmatob et al. (ICLR 2025): a fixed synthetic-data generator (||w2 - w*|| = 1, make_generator.py)
#      mixed in at a constant fraction p2 = 0.2 (lambda = 0.25) or not at all, n = 25 ... 3200, d = 5
#   4. figures/regression_{fixed,random,strong}.png and figures/regression.md
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=regression run_root="$RUNS"
simulate experiment=regression_random run_root="$RUNS"
GENERATOR="$RUNS/regression_strong_generator/model.pt"
[ -f "$GENERATOR" ] || python experiments/regression/make_generator.py "$GENERATOR" --chains 1000 --dim 5 --c 1.0
simulate experiment=regression_strong run_root="$RUNS" init.checkpoint="$GENERATOR"
python experiments/regression/analyze.py --runs "$RUNS" --out figures
