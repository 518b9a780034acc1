"""Entropy-based selection of synthetic data (simulator/selection.py, Shi et al. 2025): its rules'
invariants, its place in the loop (deterministic, more entropy than a plain draw) and its refusals."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from simulator.metrics.entropy import kl_entropy
from simulator.selection import greedy, threshold


def _candidates(chains: int = 3, n: int = 400, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(chains, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0]).unsqueeze(1), idx]


def test_greedy_is_farthest_point_selection():
    """The farthest-point invariant: the kept rows are at least as far apart as the farthest candidate
    left out is from them (each step took the farthest row, and the distance it was taken at only falls);
    ascending, distinct indices; the same generator gives the same rows."""
    x = _candidates()
    idx = greedy(x, 100, torch.Generator().manual_seed(1))
    assert idx.shape == (3, 100) and bool((idx.diff(dim=-1) > 0).all())
    assert torch.equal(idx, greedy(x, 100, torch.Generator().manual_seed(1)))
    for c in range(3):
        kept = x[c, idx[c]]
        rest = x[c, [i for i in range(400) if i not in set(idx[c].tolist())]]
        pair = torch.cdist(kept, kept) + torch.eye(100, dtype=torch.float64) * 1e9
        cover = torch.cdist(rest, kept).min(-1).values.max()
        assert pair.min() >= cover - 1e-12


def test_threshold_filter_follows_the_visiting_order():
    """tau = 0 keeps every distinct candidate it visits: the first `keep` of the random order. A fixed
    tau keeps rows pairwise farther apart than tau when one pass suffices."""
    x = _candidates()
    idx = threshold(x, 50, torch.Generator().manual_seed(2), tau=0.0)
    order = torch.rand(3, 400, generator=torch.Generator().manual_seed(2)).argsort(-1)
    assert torch.equal(idx, order[:, :50].sort(-1).values)
    idx = threshold(x, 20, torch.Generator().manual_seed(2), tau=0.5, decay=0.9)
    for c in range(3):
        kept = x[c, idx[c]]
        assert (torch.cdist(kept, kept) + torch.eye(20, dtype=torch.float64)).min() > 0.5


def test_threshold_with_copies_still_fills_the_set():
    """Candidates that are mostly exact copies: the passes decay tau, then the copies fill the set."""
    x = _candidates(1, 10).repeat(1, 20, 1)  # 10 distinct rows, 20 copies of each
    idx = threshold(x, 100, torch.Generator().manual_seed(3), decay=0.5)
    assert idx.shape == (1, 100) and len(set(idx[0].tolist())) == 100


@pytest.mark.parametrize("rule", [greedy, threshold])
def test_selection_raises_the_entropy_of_a_subset(rule):
    """Kozachenko-Leonenko entropy of the kept half against the first half of the same candidates."""
    x = _candidates(4, 600)
    kept = _pick(x, rule(x, 300, torch.Generator().manual_seed(4)))
    assert bool((kl_entropy(kept) > kl_entropy(x[:, :300]) + 0.2).all())


def _loop(selection: str | None, generations: int = 2) -> tuple[list[dict], torch.Tensor]:
    from simulator.data.toy import make_toy
    from simulator.loop import EvalOptions, SampleOptions, generation_loop
    from simulator.models.kde import KDEFamily
    from simulator.policies import Replace
    from simulator.rundir import RunDir

    chains = 4
    data = make_toy("eight_gaussians").load(chains=chains, n_train=100, n_test=200,
                                            generator=torch.Generator().manual_seed(5))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, RunDir(tmp, durable=False) as run:
        run.check_config({"test": "selection", "selection": selection})
        rows = generation_loop(run, data, lambda: KDEFamily(chains=chains, event_shape=(2,), bandwidth=0.05),
                               Replace(), generations=generations, seed=0, progress=False,
                               sample=SampleOptions(selection=selection),
                               evaluate=EvalOptions(metrics=("entropy",)))  # fmt: skip
        samples = torch.load(Path(run.gen_dir(generations)) / "samples.pt")
    return rows, samples


def test_selection_in_the_loop_is_deterministic_and_raises_entropy():
    """sample.selection=greedy: the same seed draws the same S_t; S_t's entropy beats the plain draw's."""
    rows, samples = _loop("greedy")
    again, samples_again = _loop("greedy")
    plain, _ = _loop(None)
    assert torch.equal(samples, samples_again) and rows[-1]["entropy"] == again[-1]["entropy"]
    assert all(r["entropy"] > p["entropy"] for r, p in zip(rows, plain, strict=True))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"sample.selection": "greedy", "sample.curation_k": 2}, "sample.selection: greedy and curation"),
        ({"sample.selection": "threshold", "sample.selection_decay": 1}, "sample.selection_decay: must be"),
        ({"sample.selection": "greedy", "sample.selection_k": 1}, "sample.selection_k: must be"),
        ({"sample.selection": "random"}, "sample.selection: must be one of"),
        ({"sample.selection": "greedy", "sample.selection_k": 10**15}, "sample.selection_k: each generation"),
        (
            {
                "sample.selection": "greedy",
                "model": "gaussian",
                "model.path": "statistics",
                "data": "gaussian",
            },
            "sample.selection: selection keeps individual samples, which model.path=statistics",
        ),
    ],
)
def test_refused_in_one_line(tmp_path, monkeypatch, overrides, message):
    import simulator
    from simulator.config import ConfigError

    monkeypatch.chdir(tmp_path)
    base = {"experiment": "single", "debug": "tiny", "model.options.blocks": 2, "model.options.hidden": 16}
    if overrides.get("model") == "gaussian":
        base = {"experiment": "single", "debug": "tiny"}
    with pytest.raises(ConfigError) as err:
        simulator.run({**base, **overrides})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.slow  # two interpreters import torch and run a glow on 8x8 digits
def test_sharded_selection_under_two_processes_gives_the_one_process_run(tmp_path):
    """A per-sample-seeded family (class-conditional glow) selects each shard's rows from that shard's
    candidates: 2 gloo processes, each drawing half of a shard's candidates, write the one process's
    samples and labels bit for bit (tests/test_sharded_loop.py's setting, selection for curation)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from simulator.cli import run_config
    from tests.conftest import compose_config
    from tests.test_sharded_loop import GLOW, _free_port, _rank, files

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    overrides = [o for o in GLOW if not o.startswith("sample.curation_k")] + ["sample.selection=greedy"]
    run_config(compose_config(*overrides), tmp_path / "one")
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "two"), overrides), nprocs=2, join=True)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert one.keys() == two.keys() and "gen_002/samples_00002.pt" in one
    assert all(one[k] == two[k] for k in one)
