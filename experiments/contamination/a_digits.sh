#!/usr/bin/env bash
# Experiment (a): 8x8 digits -- accuracy vs alpha for substitute, augment and the held-out real control,
# 3 seeds (one generator each), effective robustness. MLP classifier by default (~9 min on 2 shared CPU
# cores); `a_digits.sh cnn` runs the same grid with a small CNN (~16 min). Resumes if interrupted.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
EXPERIMENT=digits_alpha${1:+_$1}
RUN=runs/$EXPERIMENT/base
python -m simulator.contamination.cli contaminate/experiment="$EXPERIMENT" progress=false
python experiments/contamination/analyze.py substitute "$RUN"   # finding 1
python experiments/contamination/analyze.py robustness "$RUN"   # finding 2
python experiments/contamination/analyze.py figures "digits${1:+_$1}" "$RUN"
