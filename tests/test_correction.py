"""Self-correction (Gillman et al., ICML 2024; simulator.correction): the closed form of the idealised
correction on Gaussians through the loop, the mechanism (which rows, which streams, what the metrics see),
k-means centroids, a user's callable, and the one-line refusals.

The closed-form test runs CHAINS independent chains of the real loop and compares the chain means of
tr Sigma_t and ||mu_t - mu_0||^2 with simulator.correction.gaussian_expected at every generation, within
Z standard errors of the same chains (Z = 5: over the ~50 comparisons here a false alarm has probability
below 1e-4, while a wrong mixture rule -- e.g. moving rows partway instead of replacing them -- is off by
tens of standard errors at these sizes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator import correction, seeding
from simulator.data.base import Dataset
from simulator.data.toy import make_toy
from simulator.loop import EvalOptions, SampleOptions, generation_loop
from simulator.models.gaussian import GaussianFamily
from simulator.options import ConfigError
from simulator.policies import Mix, Replace
from simulator.rundir import RunDir
from simulator.weights import load_model
from tests.conftest import refused_in_one_line

Z = 5.0
CHAINS = 20_000


def _run(
    tmp: Path,
    gamma: float | None,
    *,
    n: int = 10,
    gens: int = 6,
    chains: int = CHAINS,
    seed: int = 0,
    policy=None,
    sample: SampleOptions | None = None,
    source: str = "gaussian",
):
    data = make_toy(source, dim=2).load(
        chains=chains, n_train=n, n_test=10, generator=torch.Generator().manual_seed(seed)
    )
    opts = sample or SampleOptions(correction="truth", correction_strength=gamma)
    with RunDir(tmp, durable=False) as run:
        run.check_config({"test": "correction", "gamma": gamma})
        rows = generation_loop(
            run,
            data,
            lambda: GaussianFamily(chains=chains, event_shape=(2,)),
            policy or Replace(),
            generations=gens,
            seed=seed,
            sample=opts,
            evaluate=EvalOptions(metrics=()),
            progress=False,
        )
        states = [load_model(run.gen_dir(t)) for t in range(gens + 1)]
    return data, rows, states


@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0])
def test_idealised_correction_matches_the_closed_form(tmp_path: Path, gamma: float) -> None:
    """Replace with the truth correction of strength gamma: E tr Sigma_t and E||mu_t - mu_0||^2 against
    gaussian_expected (20k chains, n = 10, d = 2, generations 0..6, |z| < 5 each)."""
    n, gens = 10, 6
    _, _, states = _run(tmp_path, gamma, n=n, gens=gens)
    th = correction.gaussian_expected(n, n, gamma, gens, tr_sigma0=2.0)
    for t, state in enumerate(states):
        trace = state["cov"].double().diagonal(dim1=-2, dim2=-1).sum(-1)
        err = state["mean"].double().pow(2).sum(-1)  # the truth is N(0, I_2)
        for what, values, expected in (("trace", trace, th["trace"][t]), ("mean", err, th["mean_error"][t])):
            z = (values.mean().item() - expected) / (values.std().item() / math.sqrt(CHAINS))
            assert abs(z) < Z, (
                f"gamma={gamma} t={t} {what}: {values.mean().item():.4f} vs {expected:.4f} (z={z:.1f})"
            )


def test_closed_form_reduces_to_replace_and_contracts() -> None:
    """gamma = 0 is replace's own forms; gamma > 0 reaches a fixed point above replace's collapse."""
    n, t = 10, np.arange(0, 40)
    th = correction.gaussian_expected(n, n, 0.0, 39)
    np.testing.assert_allclose(th["trace"], ((n - 1) / n) ** (t + 1))  # generation 0 is fit 1
    np.testing.assert_allclose(th["mean_error"], 1 - ((n - 1) / n) ** (t + 1))  # 1 - a^(t+1), per unit trace
    fixed = correction.gaussian_expected(n, n, 1.0, 400)["trace"]
    assert abs(fixed[-1] - fixed[-2]) < 1e-12 and fixed[-1] > 0.5  # stable, no collapse
    strong = correction.gaussian_expected(n, n, 9.0, 400)["trace"][-1]
    assert strong > fixed[-1]  # a stronger correction keeps more of the variance


def test_correction_acts_on_reads_not_on_saved_samples(tmp_path: Path) -> None:
    """S_g on disk is the model's own draw; D_t's rows are S_g's, each replaced by a truth draw with
    probability w (a binomial z-test on the share), alike on every read (the (seed, g, correction) stream)."""
    gamma, chains, n = 1.0, 400, 10
    data = make_toy("gaussian", dim=2).load(
        chains=chains, n_train=n, n_test=10, generator=torch.Generator().manual_seed(1)
    )
    opts = SampleOptions(correction="truth", correction_strength=gamma)
    with RunDir(tmp_path, durable=False) as run:
        run.check_config({"test": "reads"})
        generation_loop(
            run,
            data,
            lambda: GaussianFamily(chains=chains, event_shape=(2,)),
            Replace(),
            generations=1,
            seed=3,
            sample=opts,
            evaluate=EvalOptions(metrics=()),
            progress=False,
        )
        saved = torch.load(run.gen_dir(0) / "samples.pt", weights_only=True)
        corrector = correction.make("truth", gamma, {}, data, 3)
        assert corrector is not None
        read = corrector(saved[:, :n], None, 0)
        again = corrector(saved[:, :n], None, 0)
    assert torch.equal(read, again)
    changed = (read != saved[:, :n]).any(-1).double()
    w, m = correction.share(gamma), changed.numel()
    z = (changed.mean().item() - w) / math.sqrt(w * (1 - w) / m)
    assert abs(z) < Z, (changed.mean().item(), w, z)
    u = torch.rand(chains, n, generator=seeding.generator(3, 0, "correction"), dtype=torch.float64)
    assert torch.equal(changed.bool(), u < w)  # exactly the rows the stream picks


def test_mix_with_correction_and_a_user_callable(tmp_path: Path) -> None:
    """A user's correction through the Python API: here c(x) = 0 (the truth's mean) on every row, under
    mix(lambda=1): the fitted mean of D_t is the real mean / 2 exactly, at every generation."""

    def to_origin(x: torch.Tensor, labels, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros_like(x)

    data, _, states = _run(
        tmp_path, None, chains=8, gens=3, policy=Mix(lam=1.0), sample=SampleOptions(correction=to_origin)
    )
    for state in states[1:]:
        torch.testing.assert_close(state["mean"].double(), data.train.double().mean(1) / 2, rtol=0, atol=1e-5)


def test_kmeans_centroids_and_nearest_per_class() -> None:
    """k-means on well separated blobs finds their centres; each row goes to the nearest centroid of its
    own class; integer images are rounded back to their dtype."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2, generator=g)
    found = correction.kmeans(x, 3, torch.Generator().manual_seed(1))
    order = torch.cdist(centres, found.float()).argmin(-1)
    torch.testing.assert_close(found[order].float(), centres, atol=0.1, rtol=0)
    labels = torch.arange(2).repeat_interleave(75).unsqueeze(0)
    data = Dataset(train=x.unsqueeze(0), test=x[:5], train_labels=labels, test_labels=labels[0, :5])
    corr = correction.Corrector("kmeans", None, {"k": 2}, data, seed=0)
    probe = torch.tensor([[[9.0, 1.0], [9.0, 1.0]]])
    out = corr(probe, torch.tensor([[0, 1]]), 1)
    table = corr.centroids[0]  # type: ignore[index]
    for i, y in enumerate((0, 1)):
        best = table[y][torch.cdist(probe[0, i : i + 1].double(), table[y]).argmin()]
        torch.testing.assert_close(out[0, i].double(), best)
    img = Dataset(
        train=torch.randint(0, 256, (1, 40, 1, 2, 2), dtype=torch.uint8, generator=g),
        test=torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
        kind="image",
    )
    fixed = correction.Corrector("kmeans", None, {"k": 4, "per_class": False}, img, seed=0)(
        img.train[:, :7], None, 2
    )
    assert fixed.dtype == torch.uint8 and fixed.shape == (1, 7, 1, 2, 2)


def test_strength_zero_is_the_identity_and_share() -> None:
    assert (
        correction.share(None) == 1.0 and correction.share(math.inf) == 1.0 and correction.share(1.0) == 0.5
    )
    data = make_toy("gaussian", dim=2).load(chains=2, n_train=5, n_test=2, generator=torch.Generator())
    x = torch.randn(2, 5, 2)
    assert correction.make("truth", 0.0, {}, data, 0)(x, None, 1) is x  # type: ignore[misc]
    assert correction.make(None, None, None, data, 0) is None


BAD = [
    (["sample.correction=nope"], "sample.correction: must be one of truth, kmeans or null"),
    (["sample.correction_strength=1"], "sample.correction_strength: set without sample.correction"),
    (
        ["sample.correction=truth", "sample.correction_strength=-1"],
        "sample.correction_strength: must be a number",
    ),
    (
        ["sample.correction=truth", "+sample.correction_options.k=3"],
        "sample.correction_options.k: not an option of correction truth (allowed: none)",
    ),
    (["sample.correction=kmeans"], "sample.correction_options.per_class: per-class centroids need a class-"),
    (
        [
            "sample.correction=kmeans",
            "+sample.correction_options.per_class=true",
            "data=digits",
            "model=glow",
        ],
        "sample.correction_options.per_class: per-class centroids need a class-conditional model",
    ),
    (
        [
            "sample.correction=kmeans",
            "+sample.correction_options.per_class=false",
            "+sample.correction_options.k=0",
        ],
        "sample.correction_options.k: must be an integer >= 1, got 0",
    ),
    (
        [
            "sample.correction=kmeans",
            "+sample.correction_options.per_class=false",
            "+sample.correction_options.k=100000",
        ],
        "sample.correction_options.k: must be at most the",
    ),
    (
        ["sample.correction=truth", "data=digits", "model=glow"],
        "sample.correction: truth needs a data source with an exact sampler (a toy source), not data.",
    ),
    (
        ["sample.correction=truth", "model=gaussian", "model.path=statistics"],
        "sample.correction: corrections of rows are not drawn by model.path=statistics",
    ),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_correction_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message) -> None:
    refused_in_one_line(args, message, tmp_path, monkeypatch, capsys)


def test_statistics_pool_refuses_from_python(tmp_path: Path) -> None:
    from simulator.loop import TrainOptions

    data = make_toy("gaussian", dim=1).load(chains=2, n_train=5, n_test=2, generator=torch.Generator())
    with RunDir(tmp_path, durable=False) as run, pytest.raises(ConfigError, match="sample.correction"):
        run.check_config({"t": 1})
        generation_loop(
            run,
            data,
            lambda: GaussianFamily(chains=2, event_shape=(1,)),
            Replace(),
            generations=1,
            train=TrainOptions(statistics=True),
            sample=SampleOptions(correction="truth"),
            evaluate=EvalOptions(metrics=()),
            progress=False,
        )
