#!/usr/bin/env bash
# Experiment (b): colorized digits -- two loop runs of a class-conditional DDPM (fully synthetic and
# mixed, generations 0..4), three loop runs each (seeds 0, 1, 2: replicate s reads loop run s, so every
# interval covers the loop's variance), then classifiers on every generation's images; bias metrics per
# generation and alpha. About an hour of one CPU core for the six loop runs, 6 min for the classifiers;
# every step resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
python experiments/contamination/loop_colored.py replace mix
for policy in replace mix; do
  python -m simulator.contamination.cli contaminate/experiment=colored_generations \
    "generator.replicates=[runs/colored_loops/${policy}_s0,runs/colored_loops/${policy}_s1,runs/colored_loops/${policy}_s2]" \
    name=colored_generations_$policy progress=false
done
RUNS=(runs/colored_generations_replace/*/ runs/colored_generations_mix/*/)
python experiments/contamination/analyze.py bias "${RUNS[@]}"            # finding 3
python experiments/contamination/analyze.py figures colored "${RUNS[@]}"
