#!/usr/bin/env bash
# What collapse does to the samples (issue 20): memorisation, entropy and tail mass per generation,
# replace vs accumulate, with and without Shi et al.'s entropy selection, 3 seeds each.
#   1. 2-D: a narrow KDE of the eight Gaussians, 20 chains, 10 generations, no selection, greedy or the
#      threshold decay filter (about half a minute of one core)
#   2. digits: generation 0 of a small diffusion model per seed, then 3 fine-tuned generations per regime
#      (about 8 minutes of one core; the tiny feature extractor of `tails` is trained once and cached)
#   3. digits as Shi et al. train: a fresh model from scratch every generation on 64 digits, 4 generations
#      (about 50 minutes of one core; the two commands of each step may run side by side)
#   4. figures/memorisation_2d.png, memorisation_digits.png, memorisation_scratch.png, memorisation.md
# RUNS=dir puts the run directories elsewhere (default runs/); finished runs are skipped on re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=1
simulate experiment=memorisation_2d run_root="$RUNS"
simulate experiment=memorisation_digits_pretrain run_root="$RUNS"
simulate experiment=memorisation_digits run_root="$RUNS"
simulate experiment=memorisation_scratch_pretrain run_root="$RUNS"
simulate experiment=memorisation_scratch run_root="$RUNS"
python experiments/memorisation/analyze.py --runs "$RUNS" --out figures
