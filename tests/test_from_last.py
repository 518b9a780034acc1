"""sample.from_last = K: D_t's synthetic part drawn equally from S_{t-1}, ..., S_{t-K} (Alemohammad et al.).

On the Gaussian family with `replace`, n rows per generation and maximum likelihood (ddof 0), write
a = (n - 1) / n. With K = 1, E[tr Sigma_2 | G_0] = a^2 tr Sigma_0. With K >= 2, D_2 is n/2 samples of G_1
and n/2 of G_0; the scatter of independent rows with means m_i and covariances C_i has expectation
sum (m_i - m)(m_i - m)' + (n - 1)/n sum C_i, so
    E[Sigma_2 | G_0, G_1] = (mu_1 - mu_0)(mu_1 - mu_0)' / 4 + a (Sigma_0 + Sigma_1) / 2,
and with E||mu_1 - mu_0||^2 = tr Sigma_0 / n, E tr Sigma_1 = a tr Sigma_0:
    E[tr Sigma_2 | G_0] = (1 / (4 n) + a (1 + a) / 2) tr Sigma_0,
larger than a^2 tr Sigma_0 by (n - 1) / (2 n^2) + 1 / (4 n): the mixture of the last models slows collapse.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from simulator import policies
from simulator.cli import run_config
from simulator.config import ConfigError
from simulator.policies import REAL, assemble
from simulator.registry import make_policy
from simulator.rundir import RunDir
from simulator.weights import load_model
from tests.conftest import compose_config
from tests.test_policies import N_REAL, C, make_pool


def assembled(policy: policies.Policy, t: int) -> torch.Tensor:
    """Row ids (C, N) of D_t over a pool of unique rows: member * 1000 + row (make_pool)."""
    pool = make_pool(t, policy.pool_size(N_REAL))
    return assemble(policy.select(t, N_REAL, C, torch.Generator().manual_seed(t)), pool.__getitem__, C)[
        ..., 0
    ]


def source_counts(policy: policies.Policy, t: int) -> dict[int, int]:
    """Rows of D_t per member (REAL or a generation), read from the assembled rows' ids."""
    members = (assembled(policy, t) // 1000 - 1).long()
    for c in range(1, C):  # every chain gets the same composition
        assert torch.equal(torch.sort(members[c]).values, torch.sort(members[0]).values)
    return {int(m): int((members[0] == m).sum()) for m in torch.unique(members[0])}


@pytest.mark.parametrize("t", [1, 2, 3, 6])
def test_synthetic_rows_come_equally_from_the_last_k_generations(t):
    K = 3
    gens = list(range(max(t - K, 0), t))
    share = {g: N_REAL // len(gens) + (i < N_REAL % len(gens)) for i, g in enumerate(reversed(gens))}
    assert source_counts(policies.Replace().draw_from_last(K), t) == share
    assert source_counts(policies.Mix(1.0).draw_from_last(K), t) == {REAL: N_REAL, **share}
    fresh = source_counts(policies.Fresh(n_real=8, n_syn=9).draw_from_last(K), t)
    assert fresh == {
        REAL: 8,
        **{g: 9 // len(gens) + (i < 9 % len(gens)) for i, g in enumerate(reversed(gens))},
    }
    assert policies.Replace().draw_from_last(K).needs(t) == gens
    assert policies.Replace().draw_from_last(K).pool_size(N_REAL) == 20 + 10 + 6  # S_0 feeds D_1, D_2, D_3
    # K = 1 is today's policy, part for part
    for p in (policies.Replace(), policies.Mix(0.5), policies.Fresh(n_real=8)):
        g = torch.Generator()
        new, old = (
            p.draw_from_last(1).select(t, N_REAL, C, g.manual_seed(0)),
            p.select(t, N_REAL, C, g.manual_seed(0)),
        )
        assert [(q.members, None if q.index is None else q.index.tolist()) for q in new] == [
            (q.members, None if q.index is None else q.index.tolist()) for q in old
        ]


@pytest.mark.parametrize("K", [2, 3, 5])
def test_no_sample_enters_two_training_sets(K):
    """Each D_t holds fresh draws of each of its models: S_g's rows in D_{g+1}, ..., D_{g+K} are disjoint."""
    for policy in (policies.Replace().draw_from_last(K), policies.Mix(0.7).draw_from_last(K)):
        seen: set[int] = set()
        for t in range(1, 3 * K + 2):
            ids = [int(i) for i in assembled(policy, t)[0] if i >= 1000 * (REAL + 2)]  # synthetic rows
            assert len(ids) == policy.n_synthetic(N_REAL) and not seen & set(ids), (K, t)
            assert all(i % 1000 < policy.pool_size(N_REAL) for i in ids)
            seen |= set(ids)


def test_weighted_policies_weigh_the_whole_synthetic_part():
    """weight_real splits the weight between the real part and the synthetic one, however many generations."""
    policy = policies.Mix(1.0, weight_real=0.25).draw_from_last(3)
    parts = policy.select(5, N_REAL, C, torch.Generator().manual_seed(0))
    sizes = {REAL: N_REAL, **dict.fromkeys(range(5), policy.pool_size(N_REAL))}
    w = policy.weights(parts, sizes)
    assert len(parts) == 2 and w is not None and len(w) == 2 * N_REAL
    assert torch.isclose(w[:N_REAL].sum() / w.sum(), torch.tensor(0.25, dtype=w.dtype))


def test_from_last_is_refused_for_accumulate_and_bad_values():
    for name in ("accumulate", "accumulate_subsample"):
        with pytest.raises(ConfigError, match="^sample.from_last: .* every earlier generation") as e:
            make_policy(compose_config(f"policy={name}", "sample.from_last=2"))
        assert "\n" not in str(e.value)
    assert make_policy(compose_config("policy=accumulate", "sample.from_last=1")).needs(3) == [0, 1, 2]
    from simulator.cli import _validate

    with pytest.raises(ConfigError, match="^sample.from_last: must be an integer >= 1"):
        _validate(compose_config("sample.from_last=0"))


def traces(path, generations: int) -> torch.Tensor:
    run = RunDir(path)
    covs = [load_model(run.gen_dir(t))["cov"].double() for t in range(generations + 1)]
    return torch.stack([c.diagonal(dim1=-2, dim2=-1).sum(-1) for c in covs])  # (T + 1, chains)


def test_mixture_of_last_generations_slows_variance_collapse(tmp_path):
    chains, n, T = 4000, 10, 6
    base = ["data=gaussian", "model=gaussian", "eval=fast", "eval.metrics=[]", "eval.stability_metric=null",
            f"chains={chains}", f"generations={T}", f"data.n_train={n}", "policy=replace"]  # fmt: skip
    tr = {}
    for k in (1, 2, 3):
        run_config(compose_config(*base, f"sample.from_last={k}"), tmp_path / f"k{k}")
        tr[k] = traces(tmp_path / f"k{k}", T)
    a, z = (n - 1) / n, stats.norm.ppf(1 - 1e-4 / (2 * 4))  # family-wise 1e-4 over the 4 checks
    # first step where the regimes differ, t = 2: E[tr S_2 / tr S_0] exactly (per chain, given G_0)
    expected = {1: a**2, 2: 1 / (4 * n) + a * (1 + a) / 2, 3: 1 / (4 * n) + a * (1 + a) / 2}
    for k in (1, 2, 3):
        ratio = tr[k][2] / tr[k][0]
        assert abs(ratio.mean() - expected[k]) < z * ratio.std() / math.sqrt(chains), (
            k,
            ratio.mean(),
            expected[k],
        )
    # later generations: E[tr Sigma_T] decays more slowly with K = 3 than with K = 1 (same G_0 for both)
    assert torch.equal(tr[1][0], tr[3][0])
    diff = (tr[3][T] - tr[1][T]) / tr[1][0]
    assert diff.mean() > z * diff.std() / math.sqrt(chains), diff.mean()
