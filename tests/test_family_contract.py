"""Every family of registry.FAMILIES against the family contract (simulator/models/base.py), on the small
instance its EXAMPLE describes: a new family -- one module, one registry line, its config file -- is held
to all of it without a line here.

The protocol: sample and log_prob shapes and dtypes; a state round trip through the model file that
samples and scores bit for bit alike; reset(g) twice with equal generators giving equal states; weights=None
equal to equal weights, bit for bit. The capabilities a family declares: indices= returning rows of the full
draw (IndexedSampling); a fit killed between two checkpoints and resumed equal to an uninterrupted one
(ResumableFit); the fit to the data's statistics equal to the fit to the data (FitsStatistics). And what the
loop tests with isinstance is declared: a family that has a capability's members names the capability.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from simulator import registry, scratch
from simulator.models import base
from simulator.models.base import Example, FitCheckpoint
from simulator.weights import load_model, model_name

CAPABILITIES = (base.ResumableFit, base.IndexedSampling, base.Conditional, base.Batched, base.Exportable,
                base.FitsStatistics)  # fmt: skip
FAMILIES = sorted(registry.FAMILIES)
SLOW = {"diffusion"}  # importing diffusers alone takes seconds
PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]
N = 6  # samples per draw


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def example(name: str) -> Example:
    found = getattr(registry.family_class(name), "EXAMPLE", None)
    assert isinstance(found, Example), f"{name}: declare EXAMPLE = simulator.models.base.Example(...)"
    return found


def build(name: str) -> Any:
    ex = example(name)
    return registry.family_class(name)(chains=ex.chains, event_shape=ex.event_shape, **(ex.options or {}))


def data(name: str, seed: int = 0) -> torch.Tensor:
    """EXAMPLE's training rows: uint8 images for three event dimensions, float32 token ids for a token
    family (EXAMPLE.tokens: its vocabulary), else float32 vectors."""
    ex = example(name)
    shape = (ex.chains, ex.rows, *ex.event_shape)
    if ex.tokens is not None:
        return torch.randint(0, ex.tokens, shape, generator=gen(seed)).float()
    if len(ex.event_shape) == 3:
        return torch.randint(0, 256, shape, generator=gen(seed), dtype=torch.uint8)
    return torch.randn(shape, generator=gen(seed))


def fitted(name: str, **kwargs: Any) -> Any:
    model = build(name)
    model.reset(gen(1))
    model.fit(data(name), steps=example(name).steps, generator=gen(2), **kwargs)
    return model


def same(a: Any, b: Any, where: str = "state") -> None:
    """a and b equal bit for bit: tensors, and dicts, lists and tuples of them (an optimizer's state)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", PARAMS)
def test_sample_and_log_prob_have_the_protocols_shapes(name):
    ex, model = example(name), fitted(name)
    x = model.sample(N, generator=gen(3))
    assert x.shape == (ex.chains, N, *ex.event_shape)
    assert x.dtype == torch.uint8 if len(ex.event_shape) == 3 else x.dtype.is_floating_point
    for query in (x, x[0]):  # (C, n, *event), or (n, *event) broadcast over the chains
        lp = model.log_prob(query)
        assert lp.shape == (ex.chains, N) and lp.dtype.is_floating_point and torch.isfinite(lp).all()
    assert isinstance(model.exact_likelihood, bool) and model.chains == ex.chains


@pytest.mark.parametrize("name", PARAMS)
def test_a_state_round_trip_samples_and_scores_bit_for_bit(name, tmp_path):
    model = fitted(name)
    state = model.state_dict()
    scratch.save(state, tmp_path / model_name(state))  # as the loop writes it (safetensors or torch.save)
    again = build(name)
    again.load_state_dict(load_model(tmp_path))
    same(model.state_dict(), again.state_dict())
    x = model.sample(N, generator=gen(4))
    assert torch.equal(x, again.sample(N, generator=gen(4)))
    assert torch.equal(model.log_prob(x), again.log_prob(x))


@pytest.mark.parametrize("name", PARAMS)
def test_reset_with_equal_generators_gives_equal_states(name):
    model = build(name)
    model.reset(gen(7))
    first = model.state_dict()
    model.fit(data(name), steps=example(name).steps, generator=gen(2))  # move away from it
    model.reset(gen(7))
    same(first, model.state_dict())
    other = build(name)
    other.reset(gen(7))
    same(first, other.state_dict())


@pytest.mark.parametrize("name", PARAMS)
def test_equal_weights_are_the_unweighted_fit(name):
    rows = example(name).rows
    same(fitted(name).state_dict(), fitted(name, weights=torch.full((rows,), 3.0)).state_dict())


@pytest.mark.parametrize("name", PARAMS)
def test_indices_return_rows_of_the_full_draw(name):
    model = fitted(name)
    if not isinstance(model, base.IndexedSampling):
        pytest.skip(f"{name} draws without per-sample seeds")
    rows = [4, 0, 2]
    full = model.sample(N, generator=gen(5))
    assert torch.equal(model.sample(N, generator=gen(5), indices=rows), full[:, rows])


class Killed(BaseException):
    """Stands for SIGKILL inside a fit (a BaseException: nothing on the way out does any work)."""


@pytest.mark.parametrize("name", PARAMS)
def test_a_killed_fit_resumes_to_the_uninterrupted_one(name, tmp_path, monkeypatch):
    if not isinstance(build(name), base.ResumableFit):
        pytest.skip(f"{name} has no resumable fit")
    steps, x = example(name).steps or 6, data(name)

    def fit(checkpoint: FitCheckpoint | None) -> tuple[Any, dict]:
        model = build(name)  # a fresh process: the same start
        model.reset(gen(1))
        stats = model.fit(x, steps=steps, generator=gen(2), checkpoint=checkpoint)
        return model, stats

    whole, stats = fit(None)
    ckpt = FitCheckpoint(tmp_path / "fit_state.pt", every_steps=2)
    real, saves = scratch.save, []

    def save_or_die(obj, path, durable=True):  # the second checkpoint is never written: killed before it
        saves.append(path)
        if len(saves) == 2:
            raise Killed
        real(obj, path, durable)

    monkeypatch.setattr(scratch, "save", save_or_die)
    with pytest.raises(Killed):
        fit(ckpt)
    monkeypatch.undo()
    assert ckpt.path.exists() and torch.load(ckpt.path, weights_only=True)["step"] == 2
    resumed, again = fit(ckpt)
    same(whole.state_dict(), resumed.state_dict())
    same(whole.optimizer_state, resumed.optimizer_state)
    drop = ("seconds",)
    assert {k: v for k, v in stats.items() if k not in drop} == {
        k: v for k, v in again.items() if k not in drop
    }
    assert not ckpt.path.exists(), "a finished fit removes its checkpoint"


@pytest.mark.parametrize("name", PARAMS)
def test_the_fit_to_the_statistics_is_the_fit_to_the_data(name):
    model = build(name)
    if not isinstance(model, base.FitsStatistics):
        pytest.skip(f"{name} fits only from samples")
    x = data(name).double()
    model.fit(x)
    points = model.state_dict()
    stats = model.fit_statistics(model.statistics_of(x))
    assert set(stats) <= set(fitted(name).fit(x)) | {"log_likelihood"}
    exact = model.state_dict()  # cast to the family's dtype, as the model file holds it
    assert all(exact[k].dtype == points[k].dtype for k in points)
    for k in points:
        torch.testing.assert_close(exact[k], points[k], rtol=1e-5, atol=1e-6)
    again = build(name)
    again.load_statistics_state(model.statistics_state())  # the exact state a resume continues from
    sizes = [5, 3, 0]
    one, two = (m.sample_statistics(sizes, generator=gen(6), temperature=0.8) for m in (model, again))
    for a, b in zip(one, two, strict=True):
        same(a.to_dict(), b.to_dict())
    assert [s.count for s in one] == [5, 3, 0]


@pytest.mark.parametrize("name", FAMILIES)
def test_what_the_family_has_it_declares(name):
    """The loop reads a capability through isinstance: a family with a capability's members names it (so
    the capability is part of its documented contract), and a family that names one has its members."""
    model, cls = build(name), registry.family_class(name)
    for capability in CAPABILITIES:
        declared = capability in cls.__mro__
        assert isinstance(model, capability) == declared, f"{name}: declare {capability.__name__} or drop it"
        own = [m for m in vars(capability) if not m.startswith("_") and callable(getattr(capability, m))]
        for member in own if declared else []:  # implemented, not the protocol's empty stub
            assert getattr(cls, member) is not getattr(capability, member), f"{name}: {member} is a stub"


# ---- conditional families: the same contract with class labels ------------------------------------------

CLASSES = 3


def build_conditional(name: str) -> Any:
    if base.Conditional not in registry.family_class(name).__mro__:
        pytest.skip(f"{name} is not class-conditional")
    ex = example(name)
    options = {**(ex.options or {}), "num_classes": CLASSES}
    return registry.family_class(name)(chains=ex.chains, event_shape=ex.event_shape, **options)


def labels_of(name: str, n: int, seed: int = 8) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=gen(seed))


def fitted_conditional(name: str, **kwargs: Any) -> Any:
    ex, model = example(name), build_conditional(name)
    model.reset(gen(1))
    y = labels_of(name, ex.rows).expand(ex.chains, ex.rows)  # (C, n), as the loop passes them
    model.fit(data(name), y, steps=ex.steps, generator=gen(2), **kwargs)
    return model


@pytest.mark.parametrize("name", PARAMS)
def test_a_conditional_fit_samples_the_classes_it_is_given(name, tmp_path):
    ex, model = example(name), fitted_conditional(name)
    assert model.num_classes == CLASSES
    y = labels_of(name, N, seed=9)
    x = model.sample(N, y, generator=gen(3))
    assert x.shape == (ex.chains, N, *ex.event_shape)
    other = model.sample(N, (y + 1) % CLASSES, generator=gen(3))
    assert not torch.equal(x, other), "the labels do not reach the sampler"
    state = model.state_dict()
    scratch.save(state, tmp_path / model_name(state))
    again = build_conditional(name)
    again.load_state_dict(load_model(tmp_path))
    same(state, again.state_dict())
    assert torch.equal(x, again.sample(N, y, generator=gen(3)))
    if isinstance(model, base.IndexedSampling):
        rows = [5, 1, 3]
        assert torch.equal(model.sample(N, y, generator=gen(3), indices=rows), x[:, rows])


@pytest.mark.parametrize("name", PARAMS)
def test_conditional_equal_weights_are_the_unweighted_fit(name):
    rows = example(name).rows
    weighted = fitted_conditional(name, weights=torch.full((rows,), 3.0))
    same(fitted_conditional(name).state_dict(), weighted.state_dict())
