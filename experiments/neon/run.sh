#!/usr/bin/env bash
# Neon (Alemohammad et al. 2025) at CPU scale: the paper's 2-D toy with a flow, then 8x8 digits with the
# tiny diffusion model. One core: the toy's 6 base fits ~1 min each, its 60 merges ~10 s each; the
# digits pretrain (shared with experiments/digits) ~5 min, its 18 merges ~1 min each.
#   1. experiment=neon_toy_base: a flow fitted to N(0, [[2, 1], [1, 2]]) per seed (0-5)
#   2. experiment=neon_toy: each base merged with its copy fine-tuned on its own samples, zeta in
#      {1.1, 0.9} (temperature 1/zeta), w in {-1, 0, 0.5, 1, 2}
#   3. experiment=neon_digits: the pretrained digits model merged at w in {0, 0.5, 1, 2, 3, 4}, seeds 0-2
#   4. figures/neon_toy.png, figures/neon_digits.png and figures/neon.md from the run directories
set -euo pipefail
cd "$(dirname "$0")/../.."
simulate experiment=neon_toy_base "$@"
simulate experiment=neon_toy "$@"
[ -f runs/digits_pretrain/base/gen_000/model.pt ] || simulate experiment=digits_pretrain "$@"
simulate experiment=neon_digits "$@"
python experiments/neon/analyze.py
