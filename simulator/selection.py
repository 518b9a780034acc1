"""Entropy-based selection of synthetic data (Shi et al., NeurIPS 2025, arXiv 2509.16499).

Shi et al. find that a self-consuming diffusion loop moves from generalising to memorising as the
entropy of its training set falls, and slow it by choosing, from more candidates than needed, a subset
of high entropy. With `sample.selection` set, generation t draws k n candidates (k =
`sample.selection_k`, default 2 as in their main runs; they also ran 5), all from the generation's
sample stream (seed, t, "sample"), and keeps n of them, the rows of S_t; the other candidates are
discarded. The two rules of their paper, in the space of the rows themselves (vectors as they are,
images flattened with pixels in [0, 1]: their pixel-space variant; their main runs used DINOv2 features,
which need a download and are not available here):

- greedy: farthest-point selection. Start from one candidate drawn at random, then repeatedly add the
  candidate whose distance to the kept set (to its nearest kept row) is largest: each step keeps the row
  that adds the most to the Kozachenko-Leonenko entropy's log nearest-neighbour distances.
- threshold: the threshold decay filter. Visit the candidates in a random order and keep one when its
  distance to every kept row exceeds tau; after a full pass with fewer than n kept, multiply tau by
  `sample.selection_decay` (default 0.95, theirs for replace) and pass again over those not kept.
  The first tau is `sample.selection_threshold`, or (null) the median distance of a candidate to its
  nearest other candidate (their thresholds were fixed numbers for CIFAR-10 pixels and DINOv2 features;
  this scale-free default plays their role on any data).

Greedy's distances run on the model's device (float64); the threshold filter visits one candidate at a
time, on the CPU. The random start and order come from the stream (seed, t, "selection") of each chain,
so a run is reproducible and a resumed generation selects the same rows. The kept rows are returned in
the order of the candidates (D_t's first n rows of S_t are the kept set, whatever the visiting order).

Families with per-sample seeds (IndexedSampling: diffusion, glow, ...) draw S_t in shards of
`sample.shard_size` rows (a kill resumes from the last whole shard); there each shard's n_s rows are
selected from that shard's own k n_s candidates, so with a shard smaller than S_t the selection is
local to a shard (the default shard of 5000 rows holds all of a CPU-scale draw). Under
torch.distributed every rank draws its round-robin part of a shard's candidates, the parts are gathered
and every rank selects the same rows.

Refused in one line (the config's check, `check`): with model.path=statistics (no rows are drawn), with
sample.curation_k > 1 (both choose among candidates; use one) and with the verifier or label noise
(simulator.verification: it keeps candidates by their labels).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simulator import distributed, seeding
from simulator.data.base import flat_rows
from simulator.options import ConfigError

if TYPE_CHECKING:
    from simulator.samples import SamplePool

METHODS = ("greedy", "threshold")
MAX_PASSES = 10_000  # threshold: every pass keeps a row (passes that would keep none are skipped)


def _distance_to(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Distances (C, N) from every row of x (C, N, D) to row i[c] of its own chain."""
    row = x[torch.arange(x.shape[0]), i]  # (C, D)
    return (x - row[:, None, :]).square().sum(-1).sqrt()


def greedy(x: torch.Tensor, keep: int, generator: torch.Generator, device: str | torch.device = "cpu"
           ) -> torch.Tensor:  # fmt: skip
    """Indices (C, keep), ascending, of a farthest-point selection from the candidates x (C, N, ...),
    computed on device (the start drawn from the CPU generator, so every device keeps the same rows up
    to float ties)."""
    rows = flat_rows(x, device)
    chains, n = rows.shape[:2]
    pick = torch.randint(n, (chains,), generator=generator).to(rows.device)
    kept = torch.zeros(chains, n, dtype=torch.bool, device=rows.device)
    nearest = torch.full((chains, n), torch.inf, dtype=torch.float64, device=rows.device)  # to the kept set
    every = torch.arange(chains, device=rows.device)
    for _ in range(keep):
        kept[every, pick] = True
        nearest = torch.minimum(nearest, _distance_to(rows, pick))
        pick = nearest.masked_fill(kept, -1.0).argmax(-1)  # the farthest row not kept
    return kept.nonzero()[:, 1].reshape(chains, keep).cpu()


def threshold(x: torch.Tensor, keep: int, generator: torch.Generator, tau: float | None = None,
              decay: float = 0.95) -> torch.Tensor:  # fmt: skip
    """Indices (C, keep), ascending, kept by the threshold decay filter from the candidates x (C, N, ...)."""
    rows = flat_rows(x)
    chains, n = rows.shape[:2]
    order = torch.rand(chains, n, generator=generator).argsort(-1)  # each chain's visiting order
    if tau is None:  # the median nearest-other-candidate distance, per chain
        from simulator.metrics.memorisation import MAX_ELEMS, smallest_distances

        nn = smallest_distances(rows, rows, 1, MAX_ELEMS, exclude_self=True)[..., 0]
        levels = nn.median(-1).values.tolist()
    else:
        levels = [float(tau)] * chains
    out = [_filter(rows[c].numpy(), order[c].numpy(), keep, levels[c], decay) for c in range(chains)]
    return torch.from_numpy(np.stack(out))


def _filter(rows: np.ndarray, order: np.ndarray, keep: int, level: float, decay: float) -> np.ndarray:
    """One chain's threshold decay filter: rows (N, D), visiting order (N,); the kept indices, ascending."""
    nearest = np.full(len(rows), np.inf)  # distance of each row to the kept set
    kept = np.zeros(len(rows), dtype=bool)
    count = 0
    for _ in range(MAX_PASSES):
        # a row that does not pass at the start of the pass cannot pass later in it (nearest only falls)
        for i in order[(nearest[order] > level) & ~kept[order]]:
            if nearest[i] > level:
                kept[i] = True
                count += 1
                if count == keep:
                    return np.flatnonzero(kept)
                np.minimum(nearest, np.sqrt(np.square(rows - rows[i]).sum(-1)), out=nearest)
        farthest = float(np.where(kept, -1.0, nearest).max())
        as_tensor = torch.tensor([level, farthest], dtype=torch.float64)
        level = float(_next_level(as_tensor[:1], decay, as_tensor[1:])[0])
    raise RuntimeError(f"sample.selection=threshold kept fewer than {keep} rows after {MAX_PASSES} passes")


def _next_level(level: torch.Tensor, decay: float, farthest: torch.Tensor) -> torch.Tensor:
    """tau times decay^j, j >= 1 the fewest passes after which some row not kept passes (farthest: the
    largest distance of such a row to the kept set): the passes in between would keep nothing. Rows
    left only at distance 0 (exact copies of kept rows) pass at once (tau = -1)."""
    j = torch.ones_like(level)
    stuck = (level * decay >= farthest) & (farthest > 0)
    j[stuck] = torch.floor(torch.log(farthest[stuck] / level[stuck]) / math.log(decay)) + 1
    return torch.where(farthest > 0, level * decay**j, torch.full_like(level, -1.0))


def select(x: torch.Tensor, keep: int, method: str, generator: torch.Generator, tau: float | None = None,
           decay: float = 0.95, device: str | torch.device = "cpu") -> torch.Tensor:  # fmt: skip
    """Indices (C, keep) of the candidates x (C, N, ...) that the rule keeps (ascending); greedy runs on
    device (the threshold filter visits one candidate at a time: on the CPU)."""
    if method == "greedy":
        return greedy(x, keep, generator, device)
    return threshold(x, keep, generator, tau, decay)


def _keep(pool: SamplePool, m: Any, x: torch.Tensor, y: torch.Tensor | None, t: int, keep: int,
          stream: tuple) -> Any:  # fmt: skip
    """The kept rows of the candidates x (C, k keep, ...) and of their labels y (k keep,) or None."""
    o = pool.options
    g = seeding.generator(pool.seed, t, "selection", *stream)
    device = getattr(m, "device", None) or "cpu"  # the model's device: greedy's distances run there
    idx = select(x, keep, o.selection, g, o.selection_threshold, o.selection_decay, device)
    chosen = x[torch.arange(x.shape[0]).unsqueeze(1), idx]
    return chosen, None if y is None else y[idx]  # each chain keeps its rows' own classes: (C, keep)


def draw(pool: SamplePool, m: Any, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t of a family without per-sample seeds: n_draw rows kept from k n_draw candidates."""
    k, n = pool.options.selection_k, pool.n_draw
    y = pool.labels(t, n * k)
    x = m.sample(n * k, y, generator=seeding.generator(pool.seed, t, "sample"), **pool.bias).cpu()
    return _keep(pool, m, x, y, t, n, ())


def draw_rows(pool: SamplePool, m: Any, t: int, rows: range) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `rows` of S_t (one shard) of a per-sample-seeded family: its len(rows) rows kept from the k
    len(rows) candidates of those rows, each rank drawing its round-robin part of the candidates."""
    k = pool.options.selection_k
    candidates = [i * k + j for i in rows for j in range(k)]
    mine = [candidates[i] for i in distributed.shard(len(candidates))]
    y_all = pool.labels(t, pool.n_draw * k)
    x = m.sample(pool.n_draw * k, y_all, generator=seeding.generator(pool.seed, t, "sample"), indices=mine,
                 **pool.bias).cpu()  # fmt: skip
    gathered = distributed.gather_shards(x.movedim(1, 0).contiguous(), len(candidates)).movedim(0, 1)
    x = gathered.clone(memory_format=torch.contiguous_format)  # the rows back in candidate order
    y = None if y_all is None else y_all[candidates]
    return _keep(pool, m, x, y, t, len(rows), (rows.start,))


def check(
    method: Any, decay: Any, curation_k: Any, path: Any, verifier: Any = None, noise: Any = None
) -> None:
    """One ConfigError line for a selection the loop cannot run (the options' own bounds are the schema's,
    simulator.config.Sample)."""
    if method is None:
        return
    if path == "statistics":
        raise ConfigError("sample.selection: selection keeps individual samples, which model.path=statistics "
                          "never draws; use null or model.path=samples")  # fmt: skip
    if curation_k not in (None, 1):
        raise ConfigError(
            f"sample.selection: {method} and curation (sample.curation_k={curation_k}) both "
            "choose among candidates; use one (sample.curation_k=1 or sample.selection=null)"
        )
    if verifier is not None or noise:
        raise ConfigError(
            f"sample.selection: {method} keeps candidates by entropy and the verifier "
            "(sample.verifier, sample.label_noise) by their labels; use one"
        )
    if method == "threshold" and decay is not None and not 0 < float(decay) < 1:
        raise ConfigError(f"sample.selection_decay: must be in (0, 1) for threshold, got {decay}")
