"""SIMS (simulator.mitigations.sims): negative guidance (1 + omega) eps_base - omega eps_aux from an
auxiliary model fine-tuned on the base's own samples; omega = 0 is the plain sampler bit for bit; the
auxiliary network is saved with the generation (committed samples, sample.save=false redraws and resumes
agree); one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simulator import checks, mitigations, seeding
from simulator.data.base import Dataset
from simulator.loop import CommitOptions, TrainOptions, generation_loop
from simulator.mitigations import sims
from simulator.models import diffusion_sampler
from simulator.models.diffusion import DiffusionFamily
from simulator.models.flow import FlowFamily
from simulator.options import ConfigError
from simulator.policies import Replace
from simulator.rundir import RunDir
from simulator.samples import SamplePool, load
from simulator.weights import load_model
from tests.conftest import compose_config, config_refused
from tests.test_guidance import TINY, digits

PLAIN = SimpleNamespace(bias={"temperature": 1.0}, conditional=False)


def make() -> DiffusionFamily:
    return DiffusionFamily(chains=1, event_shape=(1, 8, 8), batch_size=16, **TINY)


def fitted(steps: int = 3) -> DiffusionFamily:
    model = make()
    model.fit(digits(32)[0], steps=steps, generator=torch.Generator().manual_seed(0))
    return model


def test_the_auxiliary_model_is_the_base_fine_tuned_on_its_own_samples() -> None:
    model = fitted()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    stats = sims.step(
        sims.SimsOptions(omega=1.5, n_self=24, steps=3), model, 0, make_model=make, pool=PLAIN, seed=0
    )
    assert stats["sims"]["omega"] == 1.5 and stats["sims"]["loss_last"] is not None
    state = model.state_dict()
    assert all(torch.equal(base[k], state[k]) for k in base)  # the base is untouched
    aux = {k[4:]: v for k, v in state.items() if k.startswith("aux.")}
    assert aux.keys() == {k[4:] for k in base if k.startswith("ema.")}  # the aux's sampling weights
    assert any(not torch.equal(aux[k], base[f"ema.{k}"]) for k in aux) and float(state["aux_omega"]) == 1.5


def test_guided_eps_is_the_formula_of_the_two_networks() -> None:
    model = fitted()
    sims.step(sims.SimsOptions(omega=0.75, n_self=16, steps=2), model, 0, make_model=make, pool=PLAIN, seed=1)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.tensor([999, 500, 10, 0, 250])
    net = model._net()
    got = diffusion_sampler.guided_eps(model, net, x, t, None, 0.0)
    want = 1.75 * model._eps(net, x, t, None) - 0.75 * model._eps(model.aux, x, t, None)
    assert torch.equal(got, want)


def test_an_exported_pipeline_carries_the_auxiliary_network_and_its_weight(tmp_path: Path) -> None:
    """export_pipeline with SIMS: pipeline/aux_unet/ is the auxiliary network (the same eps on the same
    input), sampling.json's sims names it and omega, and DDIMPipeline still loads the directory."""
    from diffusers import DDIMPipeline, UNet2DModel

    model = fitted()
    model.export_pipeline = True
    sims.step(sims.SimsOptions(omega=0.75, n_self=16, steps=2), model, 0, make_model=make, pool=PLAIN, seed=1)
    out = model.export(tmp_path)
    assert out is not None
    sampling = json.loads((out / "sampling.json").read_text())
    assert sampling["sims"] == {"omega": 0.75, "aux_unet": "aux_unet"}
    aux = UNet2DModel.from_pretrained(str(out / sampling["sims"]["aux_unet"])).eval()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([999, 500, 10, 0])
    with torch.no_grad():
        torch.testing.assert_close(aux(x, t).sample, model._eps(model.aux, x, t, None), rtol=0, atol=1e-6)
    DDIMPipeline.from_pretrained(str(out))  # the extra folder does not stop diffusers' loader
    model.set_aux(None, 0.0)
    assert "sims" not in json.loads((model.export(tmp_path / "plain") / "sampling.json").read_text())


def test_omega_0_samples_the_base_bit_for_bit_without_calling_the_auxiliary_network() -> None:
    model = fitted()
    plain = model.sample(20, generator=torch.Generator().manual_seed(5))
    sims.step(sims.SimsOptions(omega=1.0, n_self=16, steps=2), model, 0, make_model=make, pool=PLAIN, seed=0)
    guided = model.sample(20, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(plain, guided)
    model.aux_omega = 0.0

    class Refuse(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("omega = 0 called the auxiliary network")

    model.aux = Refuse()
    assert torch.equal(model.sample(20, generator=torch.Generator().manual_seed(5)), plain)


def test_the_auxiliary_network_travels_with_the_state_dict() -> None:
    model = fitted()
    sims.step(sims.SimsOptions(omega=2.0, n_self=16, steps=2), model, 0, make_model=make, pool=PLAIN, seed=0)
    other = make()
    other.load_state_dict(model.state_dict())
    assert other.aux_omega == 2.0
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert torch.equal(
        model.sample(12, generator=g(), indices=[3, 0, 7]), other.sample(12, generator=g())[:, [3, 0, 7]]
    )
    other.load_state_dict(fitted().state_dict())  # a state without one removes it
    assert other.aux is None and other.aux_omega == 0.0


def _run(path: Path, save: bool, fail_at: int | None = None) -> tuple[list[dict], Path]:
    """Two SIMS generations on 32 digits, fully synthetic: generation 1 trains on S_0, read back from disk
    (save) or redrawn from gen_000's model file, auxiliary network included (save=false). fail_at: the
    generation whose sampling is interrupted once, after its model (and auxiliary network) is written."""
    x, _ = digits(32)
    data = Dataset(train=x, test=x[0, :8], kind="image")
    step = mitigations.after_fit({"sims": {"omega": 1.0, "n_self": 16, "steps": 2}})
    calls: list[int] = []

    def counted(*a, **k):
        calls.append(a[1])
        return step(*a, **k)

    train = TrainOptions(steps=2, steps_gen0=3, after_fit=counted)
    real = SamplePool.generate

    def once(self, model, t, *a, **k):
        if t == fail_at and not calls.count(-1):
            calls.append(-1)
            raise KeyboardInterrupt
        return real(self, model, t, *a, **k)

    SamplePool.generate = once  # type: ignore[method-assign]
    try:
        for _ in range(2):
            try:
                with RunDir(path, durable=False) as run:
                    run.check_config({"test": "sims"})
                    rows = generation_loop(run, data, make, Replace(), generations=1, progress=False,
                                           train=train, commit=CommitOptions(save_samples=save))  # fmt: skip
                break
            except KeyboardInterrupt:
                continue
    finally:
        SamplePool.generate = real  # type: ignore[method-assign]
    assert calls == ([0, 1] if fail_at is None else [0, 1, -1])  # the resume did not fine-tune it again
    return rows, path


def test_sample_save_false_redraws_the_guided_samples_exactly(tmp_path: Path) -> None:
    saved, a = _run(tmp_path / "a", save=True)
    redrawn, b = _run(tmp_path / "b", save=False)
    assert [r["train"]["loss_last"] for r in saved] == [r["train"]["loss_last"] for r in redrawn]
    assert saved[1]["train"]["sims"] == redrawn[1]["train"]["sims"]
    for t in (0, 1):
        ma, mb = load_model(a / f"gen_{t:03d}"), load_model(b / f"gen_{t:03d}")
        assert "aux_omega" in ma and all(torch.equal(ma[k], mb[k]) for k in ma)
    m = make()  # a committed generation's model draws its committed samples again
    m.load_state_dict(load_model(a / "gen_001"))
    n = load(a / "gen_001").shape[1]
    assert torch.equal(m.sample(n, generator=seeding.generator(0, 1, "sample")), load(a / "gen_001"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["mitigation.sims.omega=1"],
         "mitigation.sims.omega: negative guidance combines diffusion scores; model.family=flow"),
        (["model=gaussian", "data=gaussian", "mitigation.sims.omega=1"],
         "mitigation.sims.omega: negative guidance"),
        (["model=diffusion_tiny", "data=digits", "mitigation.sims.omega=-1"],
         "mitigation.sims.omega: must be"),
        (["model=diffusion_tiny", "data=digits", "mitigation.sims.steps=0", "mitigation.sims.omega=1"],
         "mitigation.sims.steps: must be"),
    ],
)  # fmt: skip
def test_bad_sims_configs_are_one_line(overrides: list[str], match: str) -> None:
    config_refused(overrides, match)


def test_a_diffusion_sims_config_passes_and_a_flow_is_refused_at_run_time_too() -> None:
    checks.check(compose_config("experiment=single", "model=diffusion_tiny", "data=digits", "eval=digits",
                                "mitigation.sims.omega=1"))  # fmt: skip
    flow = FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=8)
    with pytest.raises(ConfigError, match="FlowFamily has none"):
        sims.step(sims.SimsOptions(omega=1.0), flow, 0, make_model=lambda: flow, pool=PLAIN, seed=0)


@pytest.mark.slow  # the call site is Neon's too: tests/test_neon.py's resume test runs by default
def test_a_resume_after_the_auxiliary_model_is_written_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    rows, a = _run(tmp_path / "a", save=True)
    again, b = _run(tmp_path / "b", save=True, fail_at=1)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in again]
    for t in (0, 1):
        ma, mb = load_model(a / f"gen_{t:03d}"), load_model(b / f"gen_{t:03d}")
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
        assert torch.equal(load(a / f"gen_{t:03d}"), load(b / f"gen_{t:03d}"))
