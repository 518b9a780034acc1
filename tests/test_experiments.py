"""Every experiment config composes and validates; the GPU experiments' smoke versions run on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from simulator import samples as store
from simulator.cli import CONFIG_DIR, _validate, run_config
from simulator.config import ConfigError

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "progress=false", *overrides])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    cfg = experiment(name)
    assert cfg.name == name or name == "single"
    try:
        _validate(cfg)
    except ConfigError as e:
        # the only acceptable failures are files a user makes first: a pretrained start (a model.pt or
        # a diffusers directory fetched once), or the Inception weights (absent on a machine that never
        # ran make_fid_weights.py)
        starts = ("init.checkpoint: file not found", "init.pretrained: directory not found",
                  "eval.options.weights_path")  # fmt: skip
        assert str(e).startswith(starts), e


def _sweep_values(name: str, key: str) -> list[str]:
    """The values an experiment's sweep takes for key (its hydra.sweeper.params)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    return [v.strip() for v in str(cfg.hydra.sweeper.params[key]).split(",")]


ARMS = [(name, arm) for name in ("mitigations_2d", "mitigations_digits", "mitigations_cifar10")
        for arm in _sweep_values(name, "+arm")]  # fmt: skip


@pytest.mark.parametrize("name,arm", ARMS, ids=[f"{n}-{a}" for n, a in ARMS])
def test_every_arm_of_the_mitigation_comparisons_passes_the_checks(name, arm):
    """Each job of the mitigation sweeps (an arm of configs/arm/ on the experiment's setting) passes the
    config's whole walk: the arm's mechanism applies to the experiment's family and data."""
    from simulator import checks

    assert arm in {p.stem for p in (Path(CONFIG_DIR) / "arm").glob("*.yaml")}
    checks.check(experiment(name, f"+arm={arm}", "hydra.mode=RUN"))


@pytest.mark.parametrize(
    "overrides, epochs",
    [
        # the config's budget, 50k images: 1/(1 + lambda) rounds to 1 epoch, and at lambda = 1 0.5 rounds
        # half to even to 0, then the floor of one epoch (their script's max(.., 1))
        (["policy=real_only"], 1), (["policy=mix_small"], 1), (["policy=mix"], 1), (["policy=mix_high"], 1),
        (["policy=replace"], 1),
        # a budget of 10 epochs at lambda = 0: the same images at every lambda, in whole epochs
        (["image_budget=500000", "policy=real_only"], 10), (["image_budget=500000", "policy=mix_small"], 9),
        (["image_budget=500000", "policy=mix"], 7), (["image_budget=500000", "policy=mix_high"], 5),
        (["image_budget=250000", "policy=mix_high"], 2),  # 2.5: half to even (np.round), not 3
        (["image_budget=150000", "policy=mix_high"], 2),  # 1.5 -> 2
        (["data.n_train=5000", "policy=mix"], 7),  # n is the real rows a run has: 50k / 7.5k = 6.67
    ],
)  # fmt: skip
def test_cifar10_bertrand_fine_tunes_the_papers_epochs(overrides, epochs):
    """Bertrand et al.'s DDPM arm: max(1, round(budget / (n (1 + lambda)))) whole epochs per generation
    (their iterative_retraining.py), from the experiment's image_budget, policy.lam and data.n_train."""
    cfg = experiment("cifar10_bertrand", *overrides)
    assert cfg.train.epochs == epochs and cfg.train.images is None
    policy = [o for o in overrides if o.startswith("policy=")]
    assert experiment("cifar10_bertrand_smoke", *policy).train.epochs == 1  # 64 images: 1 epoch


@pytest.mark.parametrize("budget", ["0", "-5", "2.5", "abc"])
def test_a_bad_image_budget_is_one_line(budget):
    one_line = r"^image_budget: must be a whole number of images >= 1, got [^\n]*$"
    with pytest.raises(ConfigError, match=one_line):
        _validate(experiment("cifar10_bertrand", f"image_budget={budget}"))


def test_cifar10_smoke_two_generations(tmp_path, shared_dir):
    cfg = experiment("cifar10_bertrand_smoke", f"data.options.root={shared_dir / 'data'}",
                     f"++eval.options.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    summary = run_config(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert summary["status"] == "complete" and [r["generation"] for r in rows] == [0, 1, 2]
    assert all(r["fid"] > 0 and r["bpd_bound"] > 0 for r in rows)
    samples = store.load(tmp_path / "run" / "gen_002")
    assert samples.dtype == torch.uint8 and samples.shape[2:] == (3, 8, 8)
    assert (tmp_path / "run" / "gen_002" / "samples.png").exists()


def test_ffhq_smoke_two_generations(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(80):  # no labels, as in FFHQ: the tiny FID extractor learns rotations instead
        pixels = torch.randint(0, 128 + 128 * (i % 2), (24, 20, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    cfg = experiment("ffhq_bertrand_smoke", f"data.options.root={folder}", "data.n_test=8",
                     f"++eval.options.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    summary = run_config(cfg, tmp_path / "run")
    assert summary["status"] == "complete"
    samples = store.load(tmp_path / "run" / "gen_002")
    assert samples.shape[2:] == (3, 8, 8)
