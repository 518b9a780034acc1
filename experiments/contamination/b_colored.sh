#!/usr/bin/env bash
# Experiment (b): colorized digits -- two loop runs of a class-conditional DDPM (fully synthetic and
# mixed, generations 0..4), then classifiers on every generation's images; bias metrics per generation
# and alpha, 3 seeds. ~25 minutes on 2 CPU cores; every step resumes if interrupted.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
python experiments/contamination/loop_colored.py replace mix
for policy in replace mix; do
  python -m simulator.contamination.cli contaminate/experiment=colored_generations \
    generator.run_dir=runs/colored_loops/$policy progress=false
done
RUNS=(runs/colored_generations/generator.run_dir=runs_colored_loops_replace
      runs/colored_generations/generator.run_dir=runs_colored_loops_mix)
python experiments/contamination/analyze.py bias "${RUNS[@]}"            # finding 3
python experiments/contamination/analyze.py figures colored "${RUNS[@]}"
