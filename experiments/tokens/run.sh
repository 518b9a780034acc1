#!/usr/bin/env bash
# The discrete (token) collapse results, one command (2.5 CPU-minutes: 10 minutes wall on 2 cores at load 10;
# every run is a categorical family fitted by counts, seconds each):
#   1. Shumailov et al. 2024: replace, V = 10 Zipf(1) tokens, n = 20, 2000 chains, 400 generations
#   2. Seddik et al. 2024: V = 50 Zipf(1) tokens, n = 100, 1000 chains, 40 generations: replace, mix
#      (lambda = 0.25, 1, 4) and fresh real rows (N = 50 new truth rows + m = 50, 200, 800 samples)
#   3. Dohmatob et al. 2024: Zipf(1.5) over V = 5000 tokens, generation 1 fits T = 100 .. 30000 samples of
#      a model fitted to 100000 real rows, decoded whole, top-k 100 or top-p 0.9; and T real rows
#   4. figures/tokens_*.png and figures/tokens.md from the run directories
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
T=100,300,1000,3000,10000,30000
simulate experiment=tokens_shumailov run_root="$RUNS"
simulate experiment=tokens_seddik run_root="$RUNS" policy=replace
simulate experiment=tokens_seddik run_root="$RUNS" policy=mix policy.lam=0.25,1,4
simulate experiment=tokens_seddik run_root="$RUNS" policy=fresh policy.source=truth policy.n_real=50 \
  policy.n_syn=50,200,800
simulate experiment=tokens_dohmatob run_root="$RUNS" policy.n_syn="$T"
simulate experiment=tokens_dohmatob run_root="$RUNS" policy.n_syn="$T" model.options.top_k=100
simulate experiment=tokens_dohmatob run_root="$RUNS" policy.n_syn="$T" model.options.top_p=0.9
simulate experiment=tokens_dohmatob run_root="$RUNS" policy=real_only data.n_train="$T"
python experiments/tokens/analyze.py --runs "$RUNS" --out figures
