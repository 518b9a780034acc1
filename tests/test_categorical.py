"""The categorical family on token data: its own science, and the discrete collapse theory as z-tests.

Each closed form (simulator/token_theory.py) is compared with the mean over many chains of a run made the
way a user makes it (`simulate model=categorical data=tokens ...`: compose_config + run_config), read back
per chain from gen_XXX/chain_metrics.pt: z = (chain mean - closed form) / standard error over chains.
Z_MAX = 4: this file computes at most Z_COUNT = 210 z-values (209 with the slow tests, 135 without; one of
each run is one-sided), and under the null each exceeds 4 with probability 6.3e-5, so all pass together with
probability >= 1 - 210 * 6.3e-5 = 98.7%
(Bonferroni; conservative, as the z-values of one run's generations are correlated); the seeds are fixed,
so a pass is reproducible, and WORST records the largest |z| of each test (printed with -s). The family's
own checks (counts, weights, decoding) are exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator import token_theory as theory
from simulator.cli import run_config
from simulator.data.tokens import TokenSource, make_tokens, token_probs
from simulator.models.categorical import CategoricalFamily, decode
from simulator.options import ConfigError
from tests.conftest import compose_config

Z_MAX, Z_COUNT = 4.0, 210
WORST: dict[str, float] = {}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def z_values(name: str, values: torch.Tensor, expected: np.ndarray | float) -> float:
    """|z| of each column of values (chains, ...) against expected (...): recorded, asserted < Z_MAX."""
    v = values.double()
    z = (v.mean(0).numpy() - expected) / (v.std(0).numpy() / math.sqrt(v.shape[0]))
    worst = float(np.max(np.abs(z)))
    WORST[name] = max(WORST.get(name, 0.0), worst)
    print(f"{name}: worst |z| = {worst:.2f} over {np.size(z)} values, {v.shape[0]} chains")
    assert worst < Z_MAX, (name, z)
    return worst


def note_one_sided(name: str, values: torch.Tensor) -> float:
    """z of mean(values) > 0 over chains (values (C,)), recorded: a bound that must hold in expectation."""
    v = values.double()
    z = float(v.mean() / (v.std() / math.sqrt(v.shape[0])))
    WORST[name] = max(WORST.get(name, -math.inf), z)
    print(f"{name}: z = {z:.2f} (one-sided), {v.shape[0]} chains")
    return z


def run(tmp: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """A token run through the CLI's config and loop; per-chain metric columns stacked (T + 1, C)."""
    cfg = compose_config(
        "data=tokens",
        "model=categorical",
        "eval=tokens",
        "eval.figures=false",
        "eval.metrics=[token_distance,token_support,param_dist]",
        "sample.save=false",
        "durable=false",
        *overrides,
    )
    run_config(cfg, tmp)
    gens = sorted(tmp.glob("gen_[0-9][0-9][0-9]"))
    chain = [torch.load(g / "chain_metrics.pt", weights_only=True) for g in gens]
    return {k: torch.stack([c[k] for c in chain]) for k in chain[0]}


# -- the data source and the family ---------------------------------------------------------------------


def test_token_source_is_normalised_and_samples_its_law():
    src = make_tokens("tokens", vocab=6, law="zipf", exponent=1.5)
    ids = torch.arange(6, dtype=torch.float32).unsqueeze(-1)
    torch.testing.assert_close(src.log_prob(ids).double().exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    x = src.sample(200_000, gen(0))
    assert x.shape == (200_000, 1) and x.dtype == torch.float32
    freq = torch.bincount(x[:, 0].long(), minlength=6).double() / len(x)
    p = token_probs(6, "zipf", 1.5)
    z = (freq - p) / (p * (1 - p) / len(x)).sqrt()
    assert z.abs().max() < Z_MAX
    assert torch.isinf(src.log_prob(torch.tensor([[0.5], [6.0], [-1.0]]))).all()  # not token ids
    uniform = TokenSource(vocab=4, law="uniform")
    torch.testing.assert_close(uniform.truth().params["probs"], torch.full((4,), 0.25, dtype=torch.float64))


def test_the_fit_is_the_counts_and_weights_count_rows():
    x = torch.tensor([[0, 0, 2, 3], [1, 1, 1, 1]], dtype=torch.float32).unsqueeze(-1)
    m = CategoricalFamily(chains=2, event_shape=(1,), vocab=4)
    m.fit(x)
    torch.testing.assert_close(
        m.probs, torch.tensor([[0.5, 0, 0.25, 0.25], [0, 1, 0, 0]], dtype=torch.float64)
    )
    # integer weights are the fit to repeated rows
    w = torch.tensor([[2.0, 1.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    rep = torch.tensor([0, 0, 0, 2, 2, 2, 3], dtype=torch.float32).view(1, -1, 1)
    one = CategoricalFamily(chains=1, event_shape=(1,), vocab=4)
    one.fit(rep)
    m.fit(x, weights=w)
    torch.testing.assert_close(m.probs[0], one.probs[0])
    # additive smoothing a: (c + a) / (n + V a)
    s = CategoricalFamily(chains=2, event_shape=(1,), vocab=4, smoothing=1.0)
    s.fit(x)
    torch.testing.assert_close(s.probs[0], torch.tensor([3, 1, 2, 2], dtype=torch.float64) / 8)
    lp = s.log_prob(torch.arange(4, dtype=torch.float32).unsqueeze(-1))
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="token ids"):
        m.fit(torch.randn(2, 4, 1))


def test_decoding_temperature_top_k_and_top_p():
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0]], dtype=torch.float64)
    assert torch.equal(decode(p), p)
    hot = decode(p, temperature=0.5)  # p^2 renormalised
    torch.testing.assert_close(hot, p.square() / p.square().sum())
    assert torch.equal(decode(p, temperature=0.0), torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(
        decode(p, top_k=2), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]], dtype=torch.float64)
    )
    # top_p = 0.8: 0.5, then 0.7 < 0.8, then 0.9 >= 0.8: three tokens (ties: the lower id first)
    torch.testing.assert_close(
        decode(p, top_p=0.8), torch.tensor([[5 / 9, 2 / 9, 2 / 9, 0, 0]], dtype=torch.float64)
    )
    torch.testing.assert_close(decode(p, top_p=0.5), torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    # sampling follows the decoded distribution
    m = CategoricalFamily.from_probs(p.expand(4, -1).clone(), top_k=3)
    x = m.sample(50_000, generator=gen(1))
    freq = torch.stack([torch.bincount(c[:, 0].long(), minlength=5) for c in x]).double() / 50_000
    q = decode(p, top_k=3)[0]
    z = (freq - q) / (q * (1 - q) / 50_000).clamp_min(1e-300).sqrt()
    assert z[:, q > 0].abs().max() < Z_MAX and (freq[:, q == 0] == 0).all()


def test_a_token_family_refuses_other_data_in_one_line(tmp_path):
    cfg = compose_config("data=gaussian", "model=categorical", "eval=tokens", "chains=2", "generations=1")
    with pytest.raises(ConfigError, match=r"^model.options.vocab: categorical needs a vocabulary size"):
        run_config(cfg, tmp_path / "a")
    cfg = compose_config(
        "data=tokens", "model=categorical", "model.options.vocab=10", "chains=2", "generations=1"
    )
    with pytest.raises(ConfigError, match=r"^model.family: categorical needs token data"):
        run_config(cfg, tmp_path / "b")
    cfg = compose_config("data=gaussian", "model=gaussian", "eval=tokens", "chains=2", "generations=1")
    with pytest.raises(ConfigError, match=r"^eval.metrics: token_distance needs token data"):
        run_config(cfg, tmp_path / "c")


@pytest.mark.slow  # matplotlib: the run's figure and the report's (about 10 s)
def test_a_fully_synthetic_run_end_to_end_and_its_report(tmp_path):
    """simulate model=categorical data=tokens eval=tokens policy=replace, figures on, then simulate-report's
    report() on the run: the metrics (nll and kl_truth turn infinite once a token is lost: counted, never
    averaged), the run's figure, and the regime table naming the family."""
    from simulator.report import report

    cfg = compose_config("data=tokens", "model=categorical", "eval=tokens", "policy=replace", "chains=50",
                         "generations=6", "data.n_train=30", "durable=false")  # fmt: skip
    summary = run_config(cfg, tmp_path / "run")
    assert summary["status"] == "complete" and summary["metric"] == "tv_truth"
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["support_size"] < rows[0]["support_size"] <= 30  # tokens are lost, never regained
    assert rows[-1]["kl_tokens_nonfinite"] > 0 and rows[-1]["nll_nonfinite"] > 0
    assert (tmp_path / "run" / "figures" / "metrics.png").exists()
    out = report([tmp_path / "run"], tmp_path / "report")
    assert "replace (categorical)" in (out / "regimes.md").read_text()
    assert (out / "stability.png").exists()


# -- Shumailov et al. 2024: the discrete chain is absorbing, a martingale --------------------------------


def test_shumailov_the_fully_synthetic_chain_ends_on_one_token_with_probability_p0(tmp_path):
    """replace, n = 6 rows a generation, V = 4 Zipf(1) tokens, 2000 chains, 100 generations: every chain
    ends on one token (the second eigenvalue of the count chain is 1 - 1/n: a chain still alive after 100
    generations has probability of order (5/6)^100 = 1e-8), token i in a fraction p_0(i) of them, and
    E[p_t] = p_0 at every t."""
    vocab, n, chains, T = 4, 6, 2000, 100
    cols = run(
        tmp_path,
        f"chains={chains}",
        f"generations={T}",
        f"data.n_train={n}",
        f"data.options.vocab={vocab}",
        "policy=replace",
        "eval.metrics=[token_support]",
        "eval.stability_metric=collision",
    )
    assert (cols["support_size"][-1] == 1).all()
    p0 = token_probs(vocab, "zipf", 1.0).numpy()
    final = CategoricalFamily(chains=chains, event_shape=(1,), vocab=vocab)
    from simulator.weights import load_model

    final.load_state_dict(load_model(tmp_path / f"gen_{T:03d}"))
    ends = final.probs  # one-hot rows
    z_values("shumailov_absorption", ends, p0)
    for t in (0, 1, 5, 30):  # the martingale: every generation's mean is the truth
        state = load_model(tmp_path / f"gen_{t:03d}")["probs"]
        z_values("shumailov_martingale", state, p0)
    # Seddik et al.'s S_t on the same chains, while they are still spreading
    s0 = float((p0**2).sum())
    ts = np.arange(0, 21)
    z_values(
        "seddik_collision_replace", cols["collision"][: len(ts)].T, theory.collision_replace(s0, n, n, ts)
    )


# -- Seddik et al. 2024: fully synthetic, mixed and fresh retraining ---------------------------------------


def test_seddik_fully_synthetic_squared_error(tmp_path):
    """replace with n = 50 rows, V = 20 uniform tokens, 2000 chains: E||p_t - p_0||^2 = (1 - s_0)(1 -
    (1 - 1/n)^(t+1)), the error grows to 1 - s_0 (a Dirac mass)."""
    n, T = 50, 20
    cols = run(
        tmp_path,
        "chains=2000",
        f"generations={T}",
        f"data.n_train={n}",
        "data.options.vocab=20",
        "data.options.law=uniform",
        "policy=replace",
    )
    s0 = 1 / 20
    z_values("seddik_l2_replace", cols["l2sq_truth"].T, theory.l2sq_replace(s0, n, n, np.arange(T + 1)))


@pytest.mark.parametrize("lam", [0.5, pytest.param(2.0, marks=pytest.mark.slow)])
def test_seddik_mixed_deviation_is_bounded(tmp_path, lam):
    """mix: all n = 40 real rows + k = lambda n samples; V = 30 Zipf(1.2) tokens, 2000 chains. The deviation
    from the first generation E||p_t - p_R||^2 (param_dist0^2: the fitted probabilities are the family's
    parameters) and the error E||p_t - p_0||^2 follow the closed forms and stay bounded for any share."""
    n, T = 40, 12
    cols = run(
        tmp_path,
        "chains=2000",
        f"generations={T}",
        f"data.n_train={n}",
        "data.options.vocab=30",
        "data.options.exponent=1.2",
        "policy=mix",
        f"policy.lam={lam}",
    )
    p0 = token_probs(30, "zipf", 1.2).numpy()
    s0, k, ts = float((p0**2).sum()), round(lam * n), np.arange(T + 1)
    z_values(
        "seddik_mix_deviation", cols["param_dist0"][1:].square().T, theory.mix_deviation(s0, n, k, ts[1:])
    )
    z_values("seddik_mix_error", cols["l2sq_truth"].T, theory.l2sq_mix(s0, n, k, ts))
    # given each chain's p_R, coordinate by coordinate at generation T, and the L1 deviation that Seddik et
    # al. bound: below sum_i sqrt(E[d_T(i)^2 | p_R]) (Jensen; one-sided)
    from simulator.weights import load_model

    p_r, p_t = (load_model(tmp_path / f"gen_{g:03d}")["probs"].double() for g in (0, T))
    d = p_t - p_r
    v = torch.from_numpy(theory.mix_deviation_coords(p_r.numpy(), n, k, T))
    seen = (v > 0).any(0)  # a token no chain's real rows hold has d = v = 0 in every chain
    z_values("seddik_mix_coords", (d.square() - v)[:, seen], 0.0)
    excess = d.abs().sum(1) - torch.from_numpy(theory.mix_l1_bound(p_r.numpy(), n, k, T))
    assert note_one_sided("seddik_mix_l1_bound", excess) < Z_MAX
    print(f"E||d_T||_1 / its bound: {float(d.abs().sum(1).mean() / (d.abs().sum(1) - excess).mean()):.3f}")


def test_seddik_tolerated_synthetic_rows():
    """The long-run excess of a mixed loop's error over its real fit's is the same for every truth, rises
    with the synthetic rows k, stays below alpha / (1 + alpha) < 1/2, and mix_tolerated_rows is its
    boundary (exact arithmetic against l2sq_mix at a late generation)."""
    for n0 in (10, 40, 1000):
        k = np.arange(1, 5000)
        ratio = theory.mix_excess_ratio(n0, k)
        alpha = k / (n0 + k)
        assert (np.diff(ratio) > 0).all() and (ratio < alpha / (1 + alpha)).all()
        assert ratio[-1] < (n0 - 1) / (2 * n0 + 1)
        for s0 in (0.05, 0.3):  # the closed form's limit, whatever the truth's collision s0
            late = theory.l2sq_mix(s0, n0, 7, 400) / ((1 - s0) / n0) - 1
            assert late == pytest.approx(float(theory.mix_excess_ratio(n0, 7)), rel=1e-12)
        for eps in (0.01, 0.1, 0.25):
            kt = theory.mix_tolerated_rows(n0, eps)
            assert kt == 0 or theory.mix_excess_ratio(n0, kt) <= eps
            assert eps < theory.mix_excess_ratio(n0, kt + 1)
    assert theory.mix_tolerated_rows(40, 0.49, k_max=10**6) == 10**6  # above the limit: any share
    assert theory.mix_tolerated_rows(40, 0.001) == 0


@pytest.mark.parametrize("n_syn", [80, pytest.param(20, marks=pytest.mark.slow)])
def test_seddik_fresh_real_data_each_generation(tmp_path, n_syn):
    """fresh source=truth: N = 20 new real rows + n_syn samples a generation (alpha = n_syn / (N + n_syn)),
    V = 30 Zipf(1) tokens, 2000 chains: e_t = (1 - s_0)/(N + n_syn) + alpha^2 (1 - 1/n_syn) e_{t-1}."""
    n0, N, T = 100, 20, 15
    cols = run(
        tmp_path,
        "chains=2000",
        f"generations={T}",
        f"data.n_train={n0}",
        "data.options.vocab=30",
        "policy=fresh",
        "policy.source=truth",
        f"policy.n_real={N}",
        f"policy.n_syn={n_syn}",
    )
    p0 = token_probs(30, "zipf", 1.0).numpy()
    z_values(
        "seddik_fresh_error", cols["l2sq_truth"].T, theory.l2sq_fresh(float((p0**2).sum()), n0, N, n_syn, T)
    )


# -- Dohmatob et al. 2024: cutting the tail when sampling ----------------------------------------------------


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "cut",
    [
        "model.options.top_k=50",
        pytest.param("model.options.top_p=0.9", marks=SLOW),
        pytest.param("model.options.top_k=null", marks=SLOW),
    ],
)
def test_dohmatob_truncation_cuts_the_tail_of_the_next_generation(tmp_path, cut):
    """Zipf(1.5) over V = 500 tokens; generation 0 fits n_0 = 5000 real rows, generation 1 fits T = 300 of
    its samples decoded with top-k / top-p (or none). Given each chain's generation 0 (its decoded q), the
    truth's mass on the tokens generation 1 lost is E = sum_i p_0(i) (1 - q(i))^T, exactly; with a cut it
    can never fall below the mass of the cut tail, and the support of generation 1 is at most k."""
    vocab, n0, T, chains = 500, 5000, 300, 1000
    cols = run(
        tmp_path,
        f"chains={chains}",
        "generations=1",
        f"data.n_train={n0}",
        f"data.options.vocab={vocab}",
        "data.options.exponent=1.5",
        "policy=replace",
        f"policy.n_syn={T}",
        cut,
    )
    from simulator.weights import load_model

    g0 = CategoricalFamily.from_probs(load_model(tmp_path / "gen_000")["probs"], **_cut(cut))
    q = g0.sampling_probs().numpy()
    p0 = token_probs(vocab, "zipf", 1.5).numpy()
    predicted = theory.lost_mass(p0, q, T)  # (C,): each chain's own expectation
    z_values("dohmatob_lost_mass", (cols["lost_mass"][1] - torch.from_numpy(predicted)).unsqueeze(1), 0.0)
    if "top_k=50" in cut:
        assert (cols["support_size"][1] <= 50).all()
        assert (cols["lost_mass"][1] >= theory.tail_beyond(p0, 50) - 1e-12).all()  # the floor of the cut
    if "null" not in cut:  # the cut raises the next generation's error above Hutter's for T real rows
        lost = cols["lost_mass"][1]
        assert (lost.mean() - theory.lost_mass(p0, p0, T)) / (lost.std() / math.sqrt(chains)) > Z_MAX


def _cut(override: str) -> dict[str, object]:
    key, value = override.split("=")
    return {} if value == "null" else {key.split(".")[-1]: int(value) if "top_k" in key else float(value)}


def test_report_worst_z(capsys):
    """Prints the worst |z| of each theory test run before it (with -s); at most Z_COUNT values."""
    for name, z in sorted(WORST.items()):
        print(f"worst |z| {name}: {z:.2f}")
    assert all(z < Z_MAX for z in WORST.values())
