#!/usr/bin/env bash
# He, Xu and Cheng (2025), golden-ratio weighting of fresh real data against the previous model's
# samples, for the Gaussian mean. One command (about a minute on an idle 2-core CPU):
#   1. simulate experiment=golden_ratio: 9 runs (w = policy.weight_real on a grid), 1000 chains,
#      50 generations of policy=fresh source=truth
#   2. experiments/golden_ratio/{stationary_error.png,results.md,results.json} from the run directories
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=golden_ratio run_root="$RUNS"
python experiments/golden_ratio/analyze.py --runs "$RUNS" --out experiments/golden_ratio
