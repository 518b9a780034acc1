"""The shared training skeleton: EMA schedule, options, autocast, divergence, and resumable fits."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

import simulator.models.training as training
from simulator import scratch
from simulator.models.base import Diverged, FitCheckpoint
from simulator.models.diffusion import DiffusionFamily
from simulator.models.flow import FlowFamily
from simulator.models.glow import GlowFamily
from simulator.models.training import EMA, EpochBatches, Objective, TrainOptions, train
from simulator.weights import load as load_weights
from simulator.weights import load_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Regression(Objective):
    """Least squares of a linear map on fixed data; `poison` makes the loss NaN from that step on."""

    def __init__(self, n: int = 32, batch_size: int = 8, poison: int | None = None) -> None:
        super().__init__(torch.nn.Linear(4, 1))
        g = gen(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
        self.batches, self.poison, self.calls, self.dtypes = EpochBatches(n, batch_size), poison, 0, []

    def draw(self, generator):
        return (self.batches.next(generator),)

    def forward(self, idx):
        out = self.net(self.x[idx])
        self.dtypes.append(out.dtype)
        self.calls += 1
        loss = (out.float() - self.y[idx]).pow(2).mean()
        return loss * float("nan") if self.poison is not None and self.calls > self.poison else loss


def test_ema_reproduces_the_project_decay_schedule_where_emamodel_differs_by_one_update():
    net = torch.nn.Linear(3, 2)
    ema = EMA(torch.nn.Linear(3, 2), decay=0.999)
    expected = [min(0.999, (1 + k) / (10 + k)) for k in range(3000)]
    assert [ema.get_decay(k + 1) for k in range(3000)] == expected
    stock = EMAModel(net.parameters(), decay=0.999)  # diffusers' own: the same but for the first update,
    assert stock.get_decay(1) == 0.0  # which copies the weights (ours keeps 0.1 of the start)
    assert [stock.get_decay(k + 1) for k in range(1, 3000)] == expected[1:]


def test_ema_updates_its_module_in_place_restarts_and_round_trips():
    target, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    ema = EMA(target, decay=0.5)
    ema.step(net.parameters())  # decay 0.1: the module moves 90% of the way to the weights
    torch.testing.assert_close(target.weight, 0.9 * net.weight, rtol=0, atol=1e-7)
    ema.step(net.parameters())
    assert ema.optimization_step == 2 and ema.cur_decay_value == min(0.5, 2 / 11)
    saved = {k: (list(v) if isinstance(v, list) else v) for k, v in ema.state_dict().items()}
    saved["shadow_params"] = [p.clone() for p in saved["shadow_params"]]
    ema.restart(net.parameters())
    assert ema.optimization_step == 0 and torch.equal(target.weight, net.weight)
    ema.load_state_dict(saved)  # copies into the module's tensors: still aliased
    assert ema.optimization_step == 2 and torch.equal(target.weight, saved["shadow_params"][0])
    assert ema.shadow_params[0].data_ptr() == target.weight.data_ptr()


@pytest.mark.parametrize(
    "field, value, match",
    [("optimizer", "lion", r"^model\.options\.optimizer: must be one of adam, adamw, sgd, got 'lion'$"),
     ("schedule", "step", r"^model\.options\.schedule: must be one of constant, cosine, got 'step'$"),
     ("amp", "fp16", r"^model\.options\.amp: must be none or bf16 on cpu \(fp16 needs CUDA\), got 'fp16'$"),
     ("lr", -1.0, r"^model\.options\.lr: must be a finite number >= 0, got -1\.0$"),
     ("warmup", -1, r"^model\.options\.warmup: must be an integer >= 0, got -1$"),
     ("check_every", 0, r"^model\.options\.check_every: must be an integer >= 1 or null, got 0$")],
)  # fmt: skip
def test_bad_options_are_one_line_errors_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match) as err:
        TrainOptions(**{field: value}).check(torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_learning_rate_factor_warms_up_linearly_then_follows_the_schedule():
    warm = TrainOptions(warmup=4)
    assert [warm.factor(k, 10) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = TrainOptions(schedule="cosine")
    assert cos.factor(0, 10) == 1.0 and cos.factor(5, 10) == pytest.approx(0.5) and cos.factor(9, 10) < 0.03


def test_bf16_autocast_runs_on_the_cpu_and_trains():
    obj = Regression()
    result = train(obj, steps=30, generator=gen(1), options=TrainOptions(amp="bf16", lr=0.05),
                   device=torch.device("cpu"))  # fmt: skip
    assert obj.dtypes[0] == torch.bfloat16, "the linear layer must run in bf16 under CPU autocast"
    assert torch.isfinite(result.losses).all() and result.losses[-5:].mean() < result.losses[:5].mean()
    assert next(obj.net.parameters()).dtype == torch.float32  # master weights stay float32


def test_non_finite_loss_raises_before_the_update_or_at_the_next_check():
    obj = Regression(poison=3)  # steps 0..2 fine, step 3 NaN
    before = None

    def snapshot(step):
        nonlocal before
        before = obj.net.weight.detach().clone()

    with pytest.raises(Diverged, match="non-finite loss at step 3"):
        train(
            obj,
            steps=10,
            generator=gen(1),
            options=TrainOptions(),
            device=torch.device("cpu"),
            on_step=snapshot,
        )
    assert torch.equal(obj.net.weight, before), "on the CPU the bad step must not update the weights"
    obj = Regression(poison=3)
    with pytest.raises(Diverged, match="at or before step 4"):  # a deferred check (as on CUDA)
        train(
            obj, steps=10, generator=gen(1), options=TrainOptions(check_every=5), device=torch.device("cpu")
        )


def test_uneven_batch_is_refused(monkeypatch):
    monkeypatch.setattr(training.distributed, "world", lambda: (0, 3))
    with pytest.raises(ValueError, match="batch_size 8 must be divisible by the number of processes"):
        training.local_rows(8)
    assert training.local_rows(9) == slice(0, 3)


class Killed(Exception):
    """Stands for SIGKILL: raised from inside the fit, between two checkpoints."""


def _kill_at(monkeypatch, draw: int) -> None:
    """Make the `draw`-th minibatch draw of the next fit raise Killed (the fit dies mid-step)."""
    real, count = EpochBatches.next, {"n": 0}

    def next_or_die(self, generator):
        count["n"] += 1
        if count["n"] == draw:
            monkeypatch.setattr(EpochBatches, "next", real)
            raise Killed
        return real(self, generator)

    monkeypatch.setattr(EpochBatches, "next", next_or_die)


FAMILIES = {
    "flow": (lambda: FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=8, batch_size=16),
             lambda g: torch.randn(1, 64, 2, generator=g)),
    "glow": (lambda: GlowFamily(chains=1, event_shape=(1, 8, 8), levels=1, blocks_per_level=2, hidden=8,
                                batch_size=8),
             lambda g: torch.randint(0, 256, (1, 24, 1, 8, 8), generator=g, dtype=torch.uint8)),
    "diffusion": (lambda: DiffusionFamily(chains=1, event_shape=(1, 8, 8), block_out_channels=(4, 8),
                                          batch_size=8, ema_decay=0.9, warmup=3),
                  lambda g: torch.randint(0, 256, (1, 24, 1, 8, 8), generator=g, dtype=torch.uint8)),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_interrupted_fit_resumes_bit_for_bit(family, tmp_path, monkeypatch):
    make, data_of = FAMILIES[family]
    data, steps = data_of(gen(0)), 9

    def fresh():
        model = make()
        model.reset(gen(1))
        model.fit(data, steps=2, generator=gen(5))  # a warm start: ActNorm fitted, EMA and Adam under way
        return model, model.optimizer_state

    whole, opt = fresh()
    stats = whole.fit(data, steps=steps, generator=gen(2), optimizer_state=opt)
    ckpt = FitCheckpoint(tmp_path / "fit_state.pt", every_steps=3)
    broken, opt = fresh()
    _kill_at(monkeypatch, draw=6)  # after the checkpoint at step 3, before the one at step 6
    with pytest.raises(Killed):
        broken.fit(data, steps=steps, generator=gen(2), optimizer_state=opt, checkpoint=ckpt)
    assert ckpt.path.exists() and torch.load(ckpt.path, weights_only=True)["step"] == 3
    resumed, opt = fresh()  # a new process: same starting weights, same optimizer state
    again = resumed.fit(data, steps=steps, generator=gen(2), optimizer_state=opt, checkpoint=ckpt)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in stats.items() if k != "seconds"} == {
        k: v for k, v in again.items() if k != "seconds"
    }
    sa, sb = whole.optimizer_state["state"], resumed.optimizer_state["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert not ckpt.path.exists(), "a finished fit removes its checkpoint"


def test_checkpoint_of_another_fit_is_refused(tmp_path):
    make, data_of = FAMILIES["flow"]
    model, data = make(), data_of(gen(0))
    ckpt = FitCheckpoint(tmp_path / "fit_state.pt", every_steps=1)
    scratch.save({"steps": 5}, ckpt.path)  # with its checksum: a bare file would be set aside, not read
    with pytest.raises(ValueError, match="belongs to a fit of 5 steps, not 4"):
        model.fit(data, steps=4, generator=gen(2), checkpoint=ckpt)


def test_timed_checkpoints_and_restarted_ema(tmp_path, monkeypatch):
    make, data_of = FAMILIES["diffusion"]
    model, data = make(), data_of(gen(0))
    model.fit(data, steps=3, generator=gen(1))
    assert model.ema_steps == 3
    saved = []
    real = training._save
    monkeypatch.setattr(
        training, "_save", lambda path, state: (saved.append(state["step"]), real(path, state))
    )
    model.fit(data, steps=4, generator=gen(2), ema="restart",
              checkpoint=FitCheckpoint(tmp_path / "s.pt", every_seconds=0.0))  # fmt: skip
    assert saved == [1, 2, 3, 4]
    assert model.ema_steps == 4, "restart: the EMA counts this fit's updates only"


# -- the generation loop's fine-tuning protocol ------------------------------------------------

FLOW_RUN = ["data=two_moons", "model=flow", "model.options.blocks=2", "model.options.hidden=16", "debug=tiny",
            "generations=2", "eval.metrics=[nll,moments]", "eval.stability_metric=nll"]  # fmt: skip


def _steps(path) -> list[float]:
    from simulator.rundir import RunDir

    return [r["train"]["steps"] for r in RunDir(path).rows()]


def test_image_budget_gives_every_lambda_the_same_steps(tmp_path):
    from simulator.cli import run_config
    from tests.conftest import compose_config

    for name, lam in (("real", 0.0), ("syn", 1.0)):
        run_config(compose_config(*FLOW_RUN, "policy=mix", f"policy.lam={lam}", "train.images=600"),
                   tmp_path / name)  # fmt: skip
    # gen 0: steps_gen0; then ceil(600 / batch_size 256) = 3 whatever the training set's size
    assert _steps(tmp_path / "real") == _steps(tmp_path / "syn") == [20.0, 3.0, 3.0]
    run_config(compose_config(*FLOW_RUN, "policy=mix", "policy.lam=1.0", "train.epochs=2"), tmp_path / "ep")
    assert _steps(tmp_path / "ep") == [20.0, 4.0, 4.0]  # epochs: ceil(2 x 400 rows / 256), twice lambda = 0's


def test_killed_mid_fit_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from simulator.cli import run_config
    from simulator.rundir import RunDir
    from tests.conftest import compose_config

    cfg = compose_config(*FLOW_RUN, "policy=mix", "train.carry_optimizer=true", "train.warmup=3",
                         "train.checkpoint_every=4", "train.steps=10")  # fmt: skip
    run_config(cfg, tmp_path / "whole")
    _kill_at(monkeypatch, draw=20 + 6)  # generation 1's seventh step: after its checkpoint at step 4
    with pytest.raises(Killed):
        run_config(cfg, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "gen_001.tmp" / "fit_state.pt").exists()
    assert (tmp_path / "resumed" / "gen_000" / "optimizer.pt").exists()
    run_config(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "gen_001" / "fit_state.pt").exists()
    whole, resumed = RunDir(tmp_path / "whole"), RunDir(tmp_path / "resumed")
    strip = [
        {k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"} for r in whole.rows()
    ]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"}
                     for r in resumed.rows()]  # fmt: skip
    for t in range(3):
        for name in ("model.safetensors", "optimizer.pt"):
            a, b = (load_weights(p / f"gen_{t:03d}" / name) for p in (whole.path, resumed.path))
            assert same(a, b), (t, name)


def same(a, b) -> bool:
    """Nested dicts/lists of tensors and numbers equal bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_carried_optimizer_changes_the_fine_tuning(tmp_path):
    from simulator.cli import run_config
    from tests.conftest import compose_config

    run_config(compose_config(*FLOW_RUN, "policy=mix", "train.carry_optimizer=false"), tmp_path / "fresh")
    run_config(compose_config(*FLOW_RUN, "policy=mix", "train.carry_optimizer=true"), tmp_path / "carry")
    a, b = (load_model(tmp_path / p / "gen_001") for p in ("fresh", "carry"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    x, y = (load_model(tmp_path / p / "gen_000") for p in ("fresh", "carry"))
    assert all(torch.equal(x[k], y[k]) for k in x), "generation 0 has no optimizer to carry"


@pytest.mark.parametrize(
    "override, message",
    [("train.images=0", "train.images: must be an integer >= 1"),
     ("train.ema=keep", "train.ema: must be one of"),
     ("train.carry_optimizer=3", "train.carry_optimizer: must be true or false"),
     ("train.checkpoint_minutes=-1", "train.checkpoint_minutes: must be a finite number > 0")],
)  # fmt: skip
def test_bad_train_options_are_one_line_errors(tmp_path, override, message):
    from simulator.cli import run_config
    from simulator.config import ConfigError
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=message):
        run_config(compose_config(*FLOW_RUN, override), tmp_path)


def test_channels_last_trains_the_same_model_up_to_rounding():
    make, data_of = FAMILIES["diffusion"]
    data, runs = data_of(gen(0)), []
    for channels_last in (False, True):
        model = DiffusionFamily(chains=1, event_shape=(1, 8, 8), block_out_channels=(4, 8), batch_size=8,
                                channels_last=channels_last)  # fmt: skip
        model.reset(gen(1))
        runs.append((model.fit(data, steps=3, generator=gen(2)), model.parameters_vector()))
    (a, pa), (b, pb) = runs
    assert runs[1][1].shape == runs[0][1].shape
    # measured: loss_last identical, weights 4e-5 relative (convolutions summed in another order)
    assert b["loss_last"] == pytest.approx(a["loss_last"], rel=1e-5)
    assert float((pb - pa).norm() / pa.norm()) < 1e-3


def test_a_carried_optimizer_state_is_not_modified_by_the_fit():
    make, data_of = FAMILIES["flow"]
    model, data = make(), data_of(gen(0))
    model.fit(data, steps=2, generator=gen(1))
    carried = model.optimizer_state
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in carried["state"].items()}
    model.fit(data, steps=3, generator=gen(2), optimizer_state=carried)
    assert same(carried["state"], before), "fit must not write into the state it was given"
    assert not same(model.optimizer_state["state"], before)


CPU = torch.device("cpu")


class Lines(Objective):
    """Least squares on n rows: no Python state in forward, so dynamo's guards see only the tensors."""

    def __init__(self, n: int, batch_size: int = 8) -> None:
        super().__init__(torch.nn.Linear(4, 1))
        g = gen(n)
        with torch.no_grad():  # the same start for the same n, whatever the global RNG
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
        self.batches = EpochBatches(n, batch_size)

    def draw(self, generator):
        return (self.batches.next(generator),)

    def forward(self, idx):
        return (self.net(self.x[idx]) - self.y[idx]).pow(2).mean()


@pytest.fixture
def compile_counter(monkeypatch):
    """torch.compile through a backend that counts the graphs dynamo hands it (and runs them eagerly)."""
    from torch._dynamo.testing import CompileCounter

    counter, real = CompileCounter(), torch.compile
    torch._dynamo.reset()  # graphs compiled by earlier tests do not count
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=counter, **kw))
    yield counter
    torch._dynamo.reset()


def test_compile_traces_once_over_generations_of_growing_data(compile_counter):
    # Every generation's fit builds a new objective over a training set of another size (a growing pool).
    # The first graph serves them all: before, the second size recompiled, and a new graph per guard
    # failure would meet dynamo's recompile limit (8), after which later generations ran uncompiled.
    for n in (32, 48, 64, 80, 96, 200, 24, 40, 56, 72):
        options = TrainOptions(compile=True)
        compiled = train(Lines(n), steps=3, generator=gen(5), options=options, device=CPU)
        plain = train(Lines(n), steps=3, generator=gen(5), options=TrainOptions(), device=CPU)
        torch.testing.assert_close(compiled.losses, plain.losses)  # the counting backend runs the graph
    assert compile_counter.frame_count == 1
    # A batch smaller than batch_size (a training set under one batch) is a new shape once, then dynamic.
    for n in (5, 6, 7):
        train(Lines(n), steps=2, generator=gen(5), options=TrainOptions(compile=True), device=CPU)
    assert compile_counter.frame_count == 2


class TinyEps(torch.nn.Module):
    """A stand-in for the UNet: (x, t, class_labels) -> an output with `.sample`, as diffusers returns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=self.conv(x) + t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_compiled_sampling_network_sees_one_batch_shape(compile_counter, device):
    # The sampler's chunks are sample_batch rows but for the last (and a shard's): a compiled network
    # gets every call padded to sample_batch rows (CPU_ROWS on the CPU), so one graph serves them all.
    # "cuda" fakes the device's name only (the tensors stay on the CPU): _eps's rule for accelerators.
    fam = DiffusionFamily(chains=1, event_shape=(1, 8, 8), block_out_channels=(4, 8), sample_batch=8)
    fam.device = torch.device(device)
    net = TinyEps()
    compiled = torch.compile(net)
    x, t = torch.randn(20, 1, 8, 8, generator=gen(0)), torch.randint(0, 1000, (20,), generator=gen(1))
    for rows in (8, 5, 8, 3, 1, 20, 2 * (9 // 2)):  # chunks, ragged ends, a guided call (2 (9 // 2) rows)
        eps = fam._eps(compiled, x[:rows], t[:rows], None)
        torch.testing.assert_close(eps, net(x[:rows], t[:rows]).sample)
    assert compile_counter.frame_count == 1
    assert fam._call_rows(compiled) == (64 if device == "cpu" else 8)
    assert fam._call_rows(net) == (64 if device == "cpu" else 0)  # uncompiled on an accelerator: no padding


@pytest.mark.slow
def test_compiled_diffusion_compiles_once_over_generations(compile_counter):
    """A tiny diffusion run's three generations (growing training set, fits and samples): one graph for
    the training objective and one for the sampling network."""
    fam = DiffusionFamily(chains=1, event_shape=(1, 8, 8), block_out_channels=(4, 8), batch_size=8, steps=2,
                          compile=True, train_timesteps=10, sample_steps=2, sample_batch=5)  # fmt: skip
    fam.reset(gen(0))
    for t, n in enumerate((16, 24, 40)):
        data = torch.randint(0, 256, (1, n, 1, 8, 8), dtype=torch.uint8, generator=gen(t))
        fam.fit(data, generator=gen(10 + t))
        fam.sample(7, generator=gen(20 + t))
    assert compile_counter.frame_count == 2
