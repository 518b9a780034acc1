"""Policies: training-set sizes per generation, no duplicated rows, and composition from the pool."""

import pytest
import torch

from simulator import policies
from simulator.policies import REAL, assemble, curate

C, N_REAL, EVENT = 3, 20, (2,)


def make_pool(t: int, n_syn: int) -> dict[int, torch.Tensor]:
    """A pool whose every row is unique: value = member * 1000 + row, chain in the second coordinate."""
    pool = {}
    for member, n in [(REAL, N_REAL)] + [(g, n_syn) for g in range(t)]:
        rows = torch.arange(n, dtype=torch.float32) + 1000 * (member + 1)
        chain = torch.arange(C, dtype=torch.float32)
        pool[member] = torch.stack(torch.broadcast_tensors(rows[None, :], chain[:, None]), dim=-1)
    return pool


CASES = [
    (policies.Replace(), lambda t: N_REAL, lambda t: {t - 1: N_REAL}),
    (policies.Replace(n_syn=7), lambda t: 7, lambda t: {t - 1: 7}),
    (policies.Mix(0.5), lambda t: N_REAL + 10, lambda t: {REAL: N_REAL, t - 1: 10}),
    (policies.Mix(0.0), lambda t: N_REAL, lambda t: {REAL: N_REAL}),
    (policies.Mix(2.0), lambda t: 3 * N_REAL, lambda t: {REAL: N_REAL, t - 1: 2 * N_REAL}),
    (policies.Fresh(n_real=8, n_syn=5), lambda t: 13, lambda t: {REAL: 8, t - 1: 5}),
    (
        policies.Accumulate(),
        lambda t: N_REAL * (t + 1),
        lambda t: {REAL: N_REAL, **{g: N_REAL for g in range(t)}},
    ),
    (policies.AccumulateSubsample(budget=15), lambda t: 15, None),
]


@pytest.mark.parametrize("policy,size,composition", CASES, ids=lambda x: getattr(x, "name", ""))
@pytest.mark.parametrize("t", [1, 2, 5])
def test_sizes_and_no_duplicates(policy, size, composition, t):
    n_syn = policy.n_synthetic(N_REAL)
    pool = make_pool(t, n_syn)
    parts = policy.select(t, N_REAL, C, torch.Generator().manual_seed(t))
    x = assemble(parts, pool.__getitem__, C)
    assert x.shape == (C, size(t), *EVENT)
    assert policy.rows(t, N_REAL) == size(t)  # what the preflight bounds is what the loop trains on
    for c in range(C):
        assert torch.all(x[c, :, 1] == c), "rows must come from their own chain"
        ids = x[c, :, 0]
        assert len(torch.unique(ids)) == len(ids), "a row appears twice in one training set"
        if composition is not None:
            members = (ids // 1000 - 1).long()
            counts = {int(m): int((members == m).sum()) for m in torch.unique(members)}
            assert counts == composition(t)


def test_accumulate_subsample_draws_uniformly_from_the_whole_pool():
    t, budget, chains = 3, 20, 4000
    policy = policies.AccumulateSubsample(budget=budget)
    parts = policy.select(t, N_REAL, chains, torch.Generator().manual_seed(0))
    index = parts[0].index
    total = N_REAL * (t + 1)
    freq = torch.bincount(index.reshape(-1), minlength=total).double() / chains
    p = budget / total  # inclusion probability of every row
    se = (p * (1 - p) / chains) ** 0.5
    assert torch.all((freq - p).abs() < 5 * se)


def test_fresh_draws_differ_between_generations():
    policy = policies.Fresh(n_real=10, n_syn=0)
    a = policy.select(1, N_REAL, C, torch.Generator().manual_seed(1))[0].index
    b = policy.select(2, N_REAL, C, torch.Generator().manual_seed(2))[0].index
    assert not torch.equal(a, b)


def test_accumulate_needs_every_earlier_generation():
    assert policies.Accumulate().needs(4) == [0, 1, 2, 3]
    assert policies.Replace().needs(4) == [3]


def test_bad_policy_options():
    with pytest.raises(policies.PolicyError, match="policy.lam"):
        policies.Mix(-0.1)
    with pytest.raises(policies.PolicyError, match="exceeds"):
        policies.Fresh(n_real=N_REAL + 1).select(1, N_REAL, C, torch.Generator())


def test_curate_keeps_best_of_k():
    reward = torch.tensor([[0, 5, 1, 9, 2, 3, 7, 1, 0, 0, 4, 8.0]])
    assert curate(reward, 3).view(-1).tolist() == [1, 3, 6, 11]
    assert curate(reward, 1).view(-1).tolist() == list(range(12))
