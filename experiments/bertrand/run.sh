#!/usr/bin/env bash
# Bertrand et al. (ICLR 2024) in 2-D, one command (about 10 minutes on 2 loaded CPU cores):
#   1. generation 0: a RealNVP flow trained on rings, one per seed (0, 1, 2)
#   2. retrained on two moons from it: lambda = 0, 0.25, 0.5, 1, 2 and fully synthetic, 8 generations
#   3. figures/bertrand.png and figures/bertrand.md from the run directories alone
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=bertrand_pretrain run_root="$RUNS"
simulate experiment=bertrand run_root="$RUNS"
simulate experiment=bertrand run_root="$RUNS" policy=mix policy.lam=2.0
simulate experiment=bertrand run_root="$RUNS" policy=replace
python experiments/bertrand/analyze.py --runs "$RUNS" --out figures
