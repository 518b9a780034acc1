"""Classifier-free guidance of the class-conditional diffusion family (Ho & Salimans 2022).

Label dropout trains a null class; sampling with weight w uses eps = (1 + w) eps(x, y) - w eps(x, null).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from simulator.config import ConfigError
from simulator.models import diffusion_sampler
from simulator.models.diffusion import CPU_ROWS, DiffusionFamily, _DiffusionObjective
from simulator.weights import load_model
from tests.conftest import compose_config

TINY = dict(block_out_channels=(4, 8), layers_per_block=1, sample_steps=5, likelihood_timesteps=4)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(**kw) -> DiffusionFamily:
    return DiffusionFamily(chains=1, event_shape=(1, 8, 8), **{**TINY, **kw})


def digits(n: int | None = None, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of scikit-learn's 8x8 digits in classes < `classes`: uint8 (1, n, 1, 8, 8), labels (n,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = torch.tensor(d.target < classes).nonzero().squeeze(1)[:n]
    x = torch.tensor(d.images * 255 / 16).round().to(torch.uint8)[keep]
    return x[None, :, None], torch.tensor(d.target)[keep]


class Recorder(torch.nn.Module):
    """A stand-in network with a known output that depends on x, t and the label; records each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None):
        self.calls.append((len(x), class_labels.clone()))
        y = class_labels.float().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.3 * x * (1 + y) - 0.01 * y + 1e-4 * t.float().view(-1, 1, 1, 1))


# -- construction and errors ----------------------------------------------------------------------


def test_label_dropout_adds_one_null_class_embedding_only_when_on() -> None:
    plain, dropped = make(num_classes=3), make(num_classes=3, label_dropout=0.1)
    assert plain.null_class is None and plain.unet.class_embedding.num_embeddings == 3
    assert dropped.null_class == 3 and dropped.unet.class_embedding.num_embeddings == 4
    assert make(num_classes=3, label_dropout=None).null_class is None  # null in the YAML: off


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(label_dropout=0.1),
            r"^model\.options\.label_dropout: must be 0 or null unless the model is "
            r"class-conditional \(num_classes set\), got 0\.1$",
        ),
        (
            dict(num_classes=3, label_dropout=1.0),
            r"^model\.options\.label_dropout: must be a finite number in "
            r"\[0, 1\) or null, got 1\.0$",
        ),
        (
            dict(num_classes=3, label_dropout=-0.1),
            r"label_dropout: must be a finite number in \[0, 1\) or null",
        ),
        (
            dict(num_classes=3, label_dropout="a lot"),
            r"label_dropout: must be a .* in \[0, 1\) or null, got 'a lot'",
        ),
    ],
)
def test_bad_label_dropout_is_one_line(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kw)


@pytest.mark.parametrize(
    "kw,w,match",
    [
        (dict(), 1.0, "class-conditional"),
        (dict(num_classes=3), 1.0, "trained with label_dropout > 0"),
        (dict(num_classes=3, label_dropout=0.1), -1.0, "guidance must be a finite number >= 0"),
        (dict(num_classes=3, label_dropout=0.1), float("inf"), "guidance must be a finite number >= 0"),
    ],
)
def test_guidance_where_it_cannot_apply_is_one_line(kw, w, match) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kw).sample(2, generator=gen(0), guidance=w)


# -- sampling -------------------------------------------------------------------------------------


def test_guidance_zero_is_the_unguided_sampler_exactly() -> None:
    fam = make(num_classes=3, label_dropout=0.2, sampler="ddpm")  # stochastic steps too
    fam.fit(*digits(24, 3), steps=2, generator=gen(0))
    y = torch.tensor([0, 2, 1, 1, 0])
    plain = fam.sample(5, y, generator=gen(1))
    assert torch.equal(plain, fam.sample(5, y, generator=gen(1), guidance=0))
    assert torch.equal(plain, fam.sample(5, y, generator=gen(1), guidance=None))
    fam.unet = fam.ema = Recorder()  # w = 0 makes no second (unconditional) pass
    fam.sample(5, y, generator=gen(1), guidance=0)
    assert all(n == CPU_ROWS and labels.max() < 3 for n, labels in fam.ema.calls)
    assert len(fam.ema.calls) == fam.sample_steps


def test_guided_eps_is_the_formula_in_one_network_call() -> None:
    fam, net, w = make(num_classes=3, label_dropout=0.1), Recorder(), 2.5
    x, t, y = (
        torch.randn(5, 1, 8, 8, generator=gen(0)),
        torch.tensor([9, 400, 999, 0, 3]),
        torch.tensor([0, 1, 2, 2, 1]),
    )
    eps = diffusion_sampler.guided_eps(fam, net, x, t, y, w)
    ((rows, labels),) = net.calls  # one padded call holds both branches
    assert rows == CPU_ROWS and torch.equal(labels[:10], torch.cat([y, torch.full((5,), 3)]))
    cond = net(x, t, class_labels=y).sample
    uncond = net(x, t, class_labels=torch.full((5,), 3)).sample
    assert torch.equal(eps, (1 + w) * cond - w * uncond)


def test_guided_eps_of_a_real_unet_equals_two_separate_passes() -> None:
    """With fixed (random) weights, the batched call gives each branch exactly what its own call gives."""
    fam, w = make(num_classes=3, label_dropout=0.1, block_out_channels=(8, 16)), 1.5
    net = fam._net()
    x, t, y = (
        torch.randn(7, 1, 8, 8, generator=gen(1)),
        torch.randint(1000, (7,), generator=gen(2)),
        torch.arange(7) % 3,
    )
    cond, uncond = fam._eps(net, x, t, y), fam._eps(net, x, t, torch.full((7,), 3))
    assert not torch.equal(cond, uncond)  # the null class is a different input
    assert torch.equal(diffusion_sampler.guided_eps(fam, net, x, t, y, w), (1 + w) * cond - w * uncond)


def test_guided_samples_are_per_sample_exact_under_sharding() -> None:
    fam = make(num_classes=3, label_dropout=0.2, eta=0.5)
    fam.fit(*digits(24, 3), steps=2, generator=gen(0))
    full = fam.sample(9, generator=gen(3), guidance=2.0)
    assert not torch.equal(full, fam.sample(9, generator=gen(3)))  # guidance changes the samples
    assert torch.equal(full[:, [7, 0, 4]], fam.sample(9, generator=gen(3), guidance=2.0, indices=[7, 0, 4]))
    fam.sample_batch = 3  # other chunks: the same rows
    assert torch.equal(full, fam.sample(9, generator=gen(3), guidance=2.0))


# -- training -------------------------------------------------------------------------------------


def test_label_dropout_replaces_a_seeded_fraction_by_the_null_class() -> None:
    p, size, draws = 0.3, 500, 8
    x, y = digits(size, 10)
    fam = make(num_classes=10, label_dropout=p, batch_size=size)
    fam.unet = Recorder()
    objective = _DiffusionObjective(fam, x[0], y)
    g, dropped = gen(5), 0
    for _ in range(draws):
        idx, t, noise, drop = objective.draw(g)
        objective(idx, t, noise, drop)
        labels = fam.unet.calls[-1][1]
        assert torch.equal(labels, torch.where(drop, 10, y[idx]))  # exactly the dropped rows are null
        assert len(drop) == size
        dropped += int(drop.sum())
    lo, hi = stats.binom.interval(0.999, size * draws, p)  # Binomial(4000, 0.3): the count's 99.9% range
    assert lo <= dropped <= hi
    again = _DiffusionObjective(fam, x[0], y).draw(gen(5))[3]
    assert torch.equal(again, _DiffusionObjective(fam, x[0], y).draw(gen(5))[3])  # seeded
    assert not torch.equal(again, _DiffusionObjective(fam, x[0], y).draw(gen(6))[3])
    plain = make(num_classes=10, batch_size=size)  # without dropout: no extra draw, the old stream
    assert len(_DiffusionObjective(plain, x[0], y).draw(gen(5))) == 3


def test_checkpoints_record_the_null_class(tmp_path) -> None:
    fam = make(num_classes=3, label_dropout=0.1)
    state = fam.state_dict()
    assert int(state["null_class"]) == 3 and "null_class" not in make(num_classes=3).state_dict()
    other = make(num_classes=3, label_dropout=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.parameters_vector(), fam.parameters_vector())
    with pytest.raises(
        ValueError, match="label_dropout: the checkpoint's null class is 3, this model's None"
    ):
        make(num_classes=3).load_state_dict(state)


# -- configuration --------------------------------------------------------------------------------

GUIDED = ["model=diffusion_tiny", "data=digits", "model.options.num_classes=10", "sample.guidance=2"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample.guidance=2"], "sample.guidance: model.family=flow has no classifier-free guidance"),
        (["model=diffusion_tiny", "data=digits", "sample.guidance=2"], "guidance needs a class-conditional"),
        (GUIDED, "sample.guidance: the model is trained without label dropout"),
        (GUIDED + ["model.options.label_dropout=0"], "trained without label dropout"),
        (["sample.guidance=-1"], "sample.guidance: must be a finite number >= 0 or null, got -1"),
        (["model=diffusion_tiny", "model.options.label_dropout=x"], "model.options.label_dropout: must be"),
    ],
)
def test_bad_guidance_config_is_one_line_before_any_work(
    tmp_path, monkeypatch, capsys, args, message
) -> None:
    from simulator.cli import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        preflight(["experiment=single", "debug=tiny", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_guidance_config_checks_data_labels_and_init_checkpoint(tmp_path) -> None:
    import dataclasses

    from simulator import checks, preflight, registry

    metrics = ("eval.metrics=[bpd]", "eval.stability_metric=bpd")  # the default's kl_truth needs a density
    cfg = compose_config(*GUIDED, "model.options.label_dropout=0.1", *metrics)
    checks.check(cfg)  # fine
    data, policy = registry.make_data(cfg), registry.make_policy(cfg)
    checks.check_data(cfg, data, policy)  # fine: labelled digits
    with pytest.raises(ConfigError, match="data.source=digits has no class labels"):
        checks.check_data(cfg, dataclasses.replace(data, train_labels=None), policy)
    torch.save(make(num_classes=3).state_dict(), tmp_path / "model.pt")  # trained without dropout
    cfg = compose_config(
        *GUIDED, "model.options.label_dropout=0.1", f"init.checkpoint={tmp_path / 'model.pt'}"
    )
    with pytest.raises(
        ConfigError, match="was trained without label dropout .* label_dropout=0.1; both must"
    ):
        preflight.check_files(cfg)  # the checkpoint's file, read once
    assert compose_config().sample.guidance is None  # the default: no guidance


def test_a_guided_run_samples_what_the_guided_model_draws(tmp_path) -> None:
    """End to end: the loop passes sample.guidance to the model; gen 0's samples are the guided draws."""
    from simulator import samples as store
    from simulator import seeding
    from simulator.cli import run_config

    args = (
        "data=digits", "data.n_train=48", "data.n_test=16", "model=diffusion_tiny", "policy=replace",
        "generations=1", "train.steps=2", "train.steps_gen0=2", "eval.metrics=[]", "durable=false",
        "eval.stability_metric=null",
        "model.options.num_classes=10", "model.options.label_dropout=0.1", "model.options.sample_steps=4",
        "model.options.batch_size=16", "model.options.block_out_channels=[4,8]", "sample.guidance=3",
        "eval.figures=false",
    )  # fmt: skip
    assert run_config(compose_config(*args), tmp_path / "run")["status"] == "complete"
    gen0 = tmp_path / "run" / "gen_000"
    x, y = store.load(gen0), store.load(gen0, kind=store.LABELS)
    fam = make(num_classes=10, label_dropout=0.1, sample_steps=4)
    fam.load_state_dict(load_model(gen0))
    g = seeding.generator(0, 0, "sample")
    assert torch.equal(x, fam.sample(x.shape[1], y.reshape(-1), generator=g, guidance=3))
    assert not torch.equal(x, fam.sample(x.shape[1], y.reshape(-1), generator=g))
    assert (
        run_config(compose_config(*args), tmp_path / "run")["status"] == "complete"
    )  # resumes: nothing to do


@pytest.mark.slow
def test_more_guidance_samples_are_classified_more_confidently_as_their_class() -> None:
    """A class-conditional model trained briefly on digits with label dropout 0.2, sampled at w = 0, 1, 3
    with the same seeds and labels: a logistic-regression classifier of real digits gives each sample's
    conditioning class log-odds log p/(1-p) that grow with w (99% Student-t intervals of the paired
    per-sample differences, 100 samples, exclude 0). log p alone saturates near 0 from w = 1 on (measured:
    -0.716, -0.123, -0.065 at w = 0, 1, 3). Alemohammad et al.'s lambda = 1, 1/2, 1/4."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits(500)
    real = digits()
    clf = LogisticRegression(max_iter=2000).fit(real[0][0].reshape(-1, 64).numpy() / 255, real[1].numpy())
    fam = make(num_classes=10, label_dropout=0.2, block_out_channels=(16, 32), sample_steps=10, batch_size=64,
               lr=2e-3, ema_decay=0.99)  # fmt: skip
    fam.fit(x, y, steps=300, generator=gen(0))
    m, weights = 100, (0.0, 1.0, 3.0)
    labels = torch.arange(m) % 10
    logp = []
    for w in weights:
        s = fam.sample(m, labels, generator=gen(1), guidance=w)[0].reshape(m, 64).double().numpy() / 255
        lp = torch.tensor(clf.predict_log_proba(s))[torch.arange(m), labels]
        logp.append(lp - torch.log(-torch.expm1(lp)))  # log-odds log p / (1 - p): no ceiling at p = 1
    for k in range(1, len(weights)):
        w0, w1, a, b = weights[k - 1], weights[k], logp[k - 1], logp[k]
        d = b - a
        half = stats.t.ppf(0.995, m - 1) * d.std() / m**0.5
        print(f"w {w0:g} -> {w1:g}: mean log-odds of y {a.mean():.3f} -> {b.mean():.3f}, "
              f"difference {d.mean():.3f} +- {half:.3f} (99% t)")  # fmt: skip
        assert d.mean() - half > 0
