#!/usr/bin/env bash
# Gerstgrasser et al. (2024) / Kazdan et al. (2024), one command (about 10 minutes on 2 loaded CPU cores):
#   1. Gaussian MLE under replace, accumulate and accumulate-subsample, n = 10, 100, 1000,
#      d = 1 (1000 chains), 10 (100 chains), 100 (10 chains), 50 fits
#   2. a Gaussian KDE of two moons under the same three policies, 20 chains, 50 generations
#   3. figures/gerstgrasser.png, gerstgrasser_kde.png and gerstgrasser.md from the run directories
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=gerstgrasser run_root="$RUNS" data.options.dim=1 chains=1000
simulate experiment=gerstgrasser run_root="$RUNS" data.options.dim=10 chains=100
simulate experiment=gerstgrasser run_root="$RUNS" data.options.dim=100 chains=10
simulate experiment=gerstgrasser_kde run_root="$RUNS"
python experiments/gerstgrasser/analyze.py --runs "$RUNS" --out figures
