#!/usr/bin/env bash
# Shumailov et al. (Nature 2024), one command (about 10 minutes on 2 loaded CPU cores):
#   1. a 1-D Gaussian refitted 1000 times on n of its own samples, n = 100, 500, 1000, ddof 0 and 1,
#      1000 chains each
#   2. a two-component 2-D GMM refitted by EM 1000 times on 500 of its own samples, 100 chains
#   3. figures/shumailov.png, figures/shumailov_gmm.png, figures/shumailov.md from the run directories
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=shumailov run_root="$RUNS"
simulate experiment=shumailov_gmm run_root="$RUNS"
python experiments/shumailov/analyze.py --runs "$RUNS" --out figures
