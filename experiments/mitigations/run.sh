#!/usr/bin/env bash
# The mitigations of collapse side by side (issue 19), one command:
#   1. two moons, the default's setting (experiment=mitigations_2d): replace alone, with Neon, with the
#      idealised self-correction and with entropy-based selection, beside mix lambda = 1, accumulate and
#      the real-only floor, seeds 0-2, 12 generations (about 5 minutes on 2 cores)
#   2. digits (experiment=mitigations_digits): the class-conditional diffusion model of
#      experiment=self_correction_digits_pretrain (trained first when missing: its own ~3 CPU-minutes)
#      retrained on its own samples alone, with Neon, SIMS, k-means self-correction, selection, and the
#      verification pair (labels wrong at 0.3, without and with a verifier), beside mix, accumulate and
#      real only, seeds 0-2, 3 generations
#   3. each sweep's report (simulate-report: regimes.md, stability.png) copied to
#      figures/mitigations_{2d,digits}_{regimes.md,stability.png}
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
START=()  # generation 0 of the digits arms: the pretrained class-conditional model
[ "$RUNS" = runs ] || START=(init.checkpoint="$RUNS/self_correction_digits_pretrain/base/gen_000/model.pt")
simulate experiment=mitigations_2d run_root="$RUNS"
simulate experiment=self_correction_digits_pretrain run_root="$RUNS" progress=false threads=1
simulate experiment=mitigations_digits run_root="$RUNS" "${START[@]}"
for name in 2d digits; do
  simulate-report "$RUNS/mitigations_$name" --out "$RUNS/mitigations_$name/figures" > /dev/null
  cp "$RUNS/mitigations_$name/figures/regimes.md" "figures/mitigations_${name}_regimes.md"
  cp "$RUNS/mitigations_$name/figures/stability.png" "figures/mitigations_${name}_stability.png"
done
python experiments/mitigations/analyze.py --runs "$RUNS" --out figures
