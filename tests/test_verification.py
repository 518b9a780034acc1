"""Verification (Feng et al. 2024; simulator.verification): label noise and a verifier of known error rates,
its closed forms -- the share of correct labels kept, p_*, and the breakdown of a linear classifier at
p_* = 1/2 on a two-class Gaussian mixture -- through the mechanism and through the loop, and the one-line
refusals.

Every closed form is checked by a z-test over many independent chains (|z| < Z = 5, the chain count in
each test); a wrong selection rule (the last kept instead of the first, no fallback, flips to the same
class) moves these shares by tens of standard errors at these sizes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from simulator import verification
from simulator.data.base import Dataset
from simulator.loop import EvalOptions, SampleOptions, generation_loop
from simulator.options import ConfigError
from simulator.policies import Replace
from simulator.rundir import RunDir
from simulator.weights import load_model
from tests.conftest import refused_in_one_line

Z = 5.0


def _binomial_z(hits: torch.Tensor, p: float) -> float:
    return (hits.double().mean().item() - p) / math.sqrt(p * (1 - p) / hits.numel())


def test_p_star_and_kept_share() -> None:
    assert verification.p_star(0.4, 0.9, 0.5) == pytest.approx(0.54 / 0.74)
    assert verification.kept_correct(0.3, 1.0, 0.0, 1) == pytest.approx(0.7)  # one candidate: no choice
    assert verification.kept_correct(0.3, 1.0, 0.0, 50) == pytest.approx(1.0)  # a perfect verifier
    assert verification.kept_correct(0.3, 0.5, 0.5, 7) == pytest.approx(0.7)  # a coin: p_* = 1 - p


@pytest.mark.parametrize("p,phi,psi,k", [(0.4, 0.9, 0.5, 3), (0.6, 0.5, 0.9, 4), (0.3, 0.8, 0.1, 1)])
def test_kept_labels_match_the_closed_form(p: float, phi: float, psi: float, k: int) -> None:
    """The share of correct labels among the rows kept from k candidates is (1 - q^k) p_* + q^k
    (1 - p)(1 - phi)/q
    (200k rows); a flipped label is uniform over the other classes (chi-square-like z per class)."""
    rows, classes = 200_000, 5
    v = verification.Verifier("oracle", p, {"keep_correct": phi, "keep_wrong": psi}, classes, seed=7)
    y = torch.arange(rows * k) % classes
    x = y.double().view(1, -1, 1)  # the candidate's own class, to recover which one was kept
    kept_x, reported = v.keep(x, y, 2, range(rows), k, rows)
    truth, reported = kept_x[0, :, 0].long(), reported[0]
    expected = verification.kept_correct(p, phi, psi, k)
    z = _binomial_z(reported == truth, expected)
    assert abs(z) < Z, (expected, z)
    wrong = (reported - truth)[reported != truth] % classes  # 1..classes-1, uniformly
    for shift in range(1, classes):
        assert abs(_binomial_z(wrong == shift, 1 / (classes - 1))) < Z


def test_rows_do_not_depend_on_sharding() -> None:
    """A row's kept candidate and label come from its own uniforms: any subset of rows gives the same."""
    n, k = 50, 3
    v = verification.Verifier("oracle", 0.5, {"keep_correct": 0.7, "keep_wrong": 0.2}, 3, seed=1)
    y = torch.arange(n * k) % 3
    x = torch.arange(n * k).double().view(1, -1, 1)
    whole = v.keep(x, y, 4, range(n), k, n)
    mine = [1, 7, 30]
    cand = torch.tensor([i * k + j for i in mine for j in range(k)])
    part = v.keep(x[:, cand], y[cand], 4, mine, k, n)
    assert torch.equal(part[0], whole[0][:, mine]) and torch.equal(part[1], whole[1][:, mine])


def _mixture(
    chains: int, n: int, d: int, sep: float, seed: int, iid: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of N(+-sep/2 e_1, I_d) for classes 1 / 0: (C, n, d) and the labels (n,), half each or (iid)
    each a fair coin, as the loop draws the classes of its candidates."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=g) if iid else torch.arange(n) % 2
    x = torch.randn(chains, n, d, generator=g, dtype=torch.float64)
    x[..., 0] += (y.double() - 0.5) * sep
    return x, y


def _gap(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(mean of rows labelled 1 - mean of rows labelled 0) . e_1 per chain: the fitted linear classifier's
    side of the Bayes direction."""
    one = (labels == 1).double()
    return (x[..., 0] * one).sum(-1) / one.sum(-1) - (x[..., 0] * (1 - one)).sum(-1) / (1 - one).sum(-1)


@pytest.mark.parametrize("p,phi,psi", [(0.4, 0.9, 0.5), (0.6, 0.5, 0.9), (0.3, 0.5, 0.5)])
def test_feng_breakdown_at_p_star_one_half(p: float, phi: float, psi: float) -> None:
    """Feng et al.'s setting: a symmetric two-class Gaussian mixture (d = 3, separation 2), labels wrong at
    rate p, an oracle verifier keeping correct labels w.p. phi and wrong ones w.p. psi, k = 8 candidates.
    The linear classifier fitted to what is kept has E[gap] = (2 share - 1) sep (z over 1000 chains), and
    it sides with the Bayes direction in almost every chain iff p_* > 1/2."""
    chains, n, k, sep = 1000, 100, 8, 2.0
    x, y = _mixture(chains, n * k, 3, sep, seed=3, iid=True)
    v = verification.Verifier("oracle", p, {"keep_correct": phi, "keep_wrong": psi}, 2, seed=11)
    kept, labels = v.keep(x, y, 1, range(n), k, n)
    gap = _gap(kept, labels)
    share = verification.kept_correct(p, phi, psi, k)
    z = (gap.mean().item() - verification.lda_gap(share, sep)) / (gap.std().item() / math.sqrt(chains))
    assert abs(z) < Z, (gap.mean().item(), verification.lda_gap(share, sep), z)
    right_side = (gap > 0).double().mean().item()
    if verification.p_star(p, phi, psi) > 0.5:
        assert right_side > 0.99
    else:
        assert right_side < 0.01
    unverified = verification.lda_gap(1 - p, sep)  # label noise alone
    helps = verification.p_star(p, phi, psi) > 1 - p
    assert (gap.mean().item() > unverified) == helps or math.isclose(verification.p_star(p, phi, psi), 1 - p)


class ClassMeans:
    """A class-conditional family for the loop test: per-class means, unit variance (num_classes = 2)."""

    num_classes = 2

    def __init__(self, chains: int, d: int) -> None:
        self.chains, self.d, self.means = chains, d, torch.zeros(chains, 2, d, dtype=torch.float64)

    def fit(self, data: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> dict[str, Any]:
        assert labels is not None
        for c in range(2):
            mine = (labels == c).double().unsqueeze(-1)  # (C, n, 1): each chain its own labels
            self.means[:, c] = (data.double() * mine).sum(1) / mine.sum(1)
        return {}

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        **_: Any,
    ) -> torch.Tensor:
        assert labels is not None
        z = torch.randn(self.chains, n, self.d, generator=generator, dtype=torch.float64)
        return self.means[:, labels] + math.sqrt(temperature) * z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"means": self.means.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.means = state["means"].clone()

    def reset(self, generator: torch.Generator) -> None:
        self.means.zero_()

    def parameters_vector(self) -> None:
        return None


@pytest.mark.parametrize("p,phi,psi", [(0.3, 0.9, 0.3), (0.6, 0.4, 0.9)])
def test_loop_class_gap_contracts_by_two_share_minus_one(
    tmp_path: Path, p: float, phi: float, psi: float
) -> None:
    """Through the loop (replace, a class-means family, label noise and the oracle verifier, k = 4): each
    generation multiplies the expected class-mean gap by (2 share - 1), so E gap_t = (2 share - 1)^t E gap_0
    -- its sign alternates when p_* < 1/2 (z over 3000 chains, generations 0..3)."""
    chains, n, k, sep, gens = 3000, 40, 4, 3.0, 3
    x, y = _mixture(chains, n, 2, sep, seed=5)
    data = Dataset(
        train=x.float(), test=x[0, :10].float(), train_labels=y.expand(chains, n), test_labels=y[:10]
    )
    opts = SampleOptions(
        curation_k=k,
        label_noise=p,
        verifier="oracle",
        verifier_options={"keep_correct": phi, "keep_wrong": psi},
    )
    with RunDir(tmp_path, durable=False) as run:
        run.check_config({"test": "verification", "p": p})
        generation_loop(
            run,
            data,
            lambda: ClassMeans(chains, 2),
            Replace(),
            generations=gens,
            seed=2,
            sample=opts,
            evaluate=EvalOptions(metrics=()),
            progress=False,
        )
        gaps = [
            (s["means"][:, 1, 0] - s["means"][:, 0, 0])
            for s in (load_model(run.gen_dir(t)) for t in range(gens + 1))
        ]
    factor = 2 * verification.kept_correct(p, phi, psi, k) - 1
    for t, gap in enumerate(gaps):
        expected = factor**t * sep
        z = (gap.mean().item() - expected) / (gap.std().item() / math.sqrt(chains))
        assert abs(z) < Z, (t, gap.mean().item(), expected, z)


BAD = [
    (["sample.verifier=nope"], "sample.verifier: must be one of oracle or null"),
    (["sample.label_noise=1"], "sample.label_noise: must be"),
    (
        ["sample.verifier=oracle", "sample.curation_k=4"],
        "sample.verifier: labels are drawn by a class-conditional",
    ),
    (["sample.label_noise=0.2"], "sample.label_noise: labels are drawn by a class-conditional model only"),
    (
        ["sample.verifier=oracle", "data=digits", "model=diffusion_tiny", "model.options.num_classes=10"],
        "sample.verifier: the verifier keeps one of sample.curation_k candidates per row",
    ),
    (
        [
            "sample.verifier=oracle",
            "sample.curation_k=3",
            "+sample.verifier_options.keep_correct=2",
            "data=digits",
            "model=diffusion_tiny",
            "model.options.num_classes=10",
        ],
        "sample.verifier_options.keep_correct: must be a probability in [0, 1], got 2",
    ),
    (
        [
            "sample.verifier=oracle",
            "sample.curation_k=3",
            "+sample.verifier_options.oops=1",
            "data=digits",
            "model=diffusion_tiny",
            "model.options.num_classes=10",
        ],
        "sample.verifier_options.oops: not an option of verifier oracle (allowed: keep_correct, keep_wrong)",
    ),
    (
        [
            "sample.verifier=oracle",
            "sample.curation_k=3",
            "sample.curation_beta=1",
            "data=digits",
            "model=diffusion_tiny",
            "model.options.num_classes=10",
        ],
        "sample.curation_reward: verification selects the candidates itself",
    ),
    (["+sample.verifier_options.keep_wrong=0.1"], "sample.verifier_options: set without sample.verifier"),
    (
        [
            "sample.label_noise=0.2",
            "sample.curation_k=2",
            "data=digits",
            "model=diffusion_tiny",
            "model.options.num_classes=10",
        ],
        "sample.curation_k: with sample.label_noise and no sample.verifier",
    ),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_verification_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message) -> None:
    refused_in_one_line(args, message, tmp_path, monkeypatch, capsys)


def test_unlabelled_rows_refused_from_python() -> None:
    v = verification.Verifier("oracle", 0.1, {}, 2, seed=0)
    with pytest.raises(ConfigError, match="class-conditional"):
        v.keep(torch.zeros(1, 4, 2), None, 1, range(2), 2, 2)  # type: ignore[arg-type]
