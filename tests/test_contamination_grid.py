"""The contamination grid end to end: loop runs as generator sources, resume, spot generators, errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from simulator.cli import CONFIG_DIR
from simulator.config import ConfigError
from simulator.contamination import cli, grid, report, sources
from simulator.data.images import make_image
from simulator.models.diffusion import DiffusionFamily
from simulator.rundir import RunError

TINY_DIFFUSION = {"block_out_channels": [8, 16], "num_classes": 10, "sample_steps": 2, "train_timesteps": 10}


def config(*overrides: str) -> DictConfig:
    """The composed simulate-contaminate config with the tiny debug group."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("contaminate", overrides=["contaminate/debug=tiny", *overrides])


def fake_loop_run(path: Path, per_class: int = 80, model_only: tuple[int, ...] = ()) -> Path:
    """A loop run directory with generations 0 and 1: noisy real digits as 'samples' with labels, or (for
    generations in model_only) just an untrained tiny class-conditional diffusion model."""
    data = make_image("digits").load(generator=torch.Generator().manual_seed(0))
    x, y = data.train[0], data.train_labels[0]
    g = torch.Generator().manual_seed(1)
    (path / "gen_000").mkdir(parents=True)
    (path / "gen_001").mkdir()
    model_cfg = {"family": "diffusion", "options": TINY_DIFFUSION}
    (path / "config.yaml").write_text(
        yaml.safe_dump({"model": model_cfg, "policy": {"name": "replace"}, "chains": 1})
    )
    (path / "results.jsonl").write_text("".join(json.dumps({"generation": t}) + "\n" for t in (0, 1)))
    model = DiffusionFamily(chains=1, event_shape=(1, 8, 8), **TINY_DIFFUSION)
    for t in (0, 1):
        torch.save(model.state_dict(), path / f"gen_{t:03d}" / "model.pt")
        if t in model_only:
            continue
        idx = torch.cat(
            [
                (y == c).nonzero().squeeze(1)[torch.randint(0, 100, (per_class,), generator=g)]
                for c in range(10)
            ]
        )
        noisy = (x[idx].float() + (20 + 20 * t) * torch.randn(len(idx), 1, 8, 8, generator=g)).clamp(0, 255)
        torch.save(noisy.round().to(torch.uint8).unsqueeze(0), path / f"gen_{t:03d}" / "samples.pt")
        torch.save(y[idx].unsqueeze(0), path / f"gen_{t:03d}" / "labels.pt")
    return path


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train")} for r in rows]


def results(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_a_half_finished_grid_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    loop = fake_loop_run(tmp_path / "loop")
    cfg = config("contaminate/generator=run", f"generator.run_dir={loop}", "generator.samples=saved")
    cli.run_contaminate(cfg, tmp_path / "whole")
    whole = results(tmp_path / "whole")
    assert [r["cell"] for r in whole] == list(range(5))
    assert [(r["kind"], r["mode"], r["ratio"]) for r in whole] == [
        ("reference", "substitute", 0.0),
        ("contaminated", "substitute", 0.0),
        ("contaminated", "substitute", 0.5),
        ("contaminated", "augment", 1.0),
        ("contaminated", "control", 0.5),
    ]
    assert whole[2]["n_generated"] + whole[2]["n_real"] == whole[0]["n_train"] == whole[4]["n_train"]
    assert whole[3]["n_train"] == 2 * whole[0]["n_train"] and whole[4]["n_heldout"] == whole[2]["n_generated"]
    assert whole[2]["gen_t"] == 1 and 0 < whole[2]["gen_ref_acc"] <= 1

    real_train = grid.classifiers.train_classifier
    calls = []

    def dies_at_cell_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(grid.classifiers, "train_classifier", dies_at_cell_3)
    with pytest.raises(RuntimeError, match="killed"):
        cli.run_contaminate(cfg, tmp_path / "resumed")
    part = tmp_path / "resumed"
    assert [r["cell"] for r in results(part)] == [0, 1, 2] and (part / "gen_003.tmp").is_dir()
    monkeypatch.setattr(grid.classifiers, "train_classifier", real_train)
    cli.run_contaminate(cfg, part)
    assert comparable(results(part)) == comparable(whole)
    assert not (part / "gen_003.tmp").exists()
    a = torch.load(tmp_path / "whole" / "gen_000" / "model.pt", weights_only=True)
    b = torch.load(part / "gen_000" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["cells"] == 5 and summary["status"] == "complete"
    assert [p.name for p in report.draw([part], tmp_path / "figures")] == ["accuracy_vs_ratio.png"]


def test_a_grid_of_an_earlier_version_is_reported_the_same_and_refused_to_resume_in_one_line(tmp_path):
    """Earlier versions keyed the rows by "generation" (RunDir's loop key; the last one wrote "cell" too)
    and named the substitute mode "replace": the report reads such a run as this version writes it; the
    grid refuses to resume it (its cells.json names the old mode) with one line saying why."""
    cfg = config("modes.substitute=[0.0]", "modes.augment=[]", "modes.control=[0.5]", "classifier.steps=5")
    new = tmp_path / "new"
    cli.run_contaminate(cfg, new)
    rows = results(new)
    assert [r["cell"] for r in rows] == [0, 1, 2] and not any("generation" in r for r in rows)
    want = json.loads((new / "summary.json").read_text())["table"]
    assert [t["cells"] for t in want] == [[0], [1], [2]]
    for keys in (("generation",), ("generation", "cell")):
        old = tmp_path / "_".join(keys)
        shutil.copytree(new, old)
        (old / "summary.json").unlink()
        rows_then = [
            {**{k: r["cell"] for k in keys}, **{k: v for k, v in r.items() if k != "cell"},
             "mode": "replace" if r["mode"] == "substitute" else r["mode"]}
            for r in rows
        ]  # fmt: skip
        (old / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_then))
        then = yaml.safe_load((old / "config.yaml").read_text())
        then["modes"] = {("replace" if m == "substitute" else m): v for m, v in then["modes"].items()}
        (old / "config.yaml").write_text(yaml.safe_dump(then, sort_keys=False))
        report.report([old], old / "figures")
        assert json.loads((old / "summary.json").read_text())["table"] == want
        with pytest.raises(RunError) as err:
            cli.run_contaminate(cfg, old)
        assert "written before contamination mode replace was renamed substitute" in str(err.value)
        assert "\n" not in str(err.value)


def test_generations_mode_walks_the_loop_run_and_falls_back_to_its_model(tmp_path):
    loop = fake_loop_run(tmp_path / "loop", model_only=(1,))
    cfg = config(
        "contaminate/generator=run",
        f"generator.run_dir={loop}",
        "modes.substitute=[]",
        "modes.augment=[]",
        "modes.control=[]",
        "modes.generations=[0.5]",
    )
    cli.run_contaminate(cfg, tmp_path / "gens")
    rows = results(tmp_path / "gens")
    assert [(r["mode"], r["gen_t"]) for r in rows[1:]] == [("generations", 0), ("generations", 1)]
    assert (tmp_path / "gens" / "pools" / "gen_000.pt").exists() and (
        tmp_path / "gens" / "pools" / "gen_001.pt"
    ).exists()
    # generation 1 kept no samples: its pool was drawn from its model.pt, so it is no copy of noisy digits
    assert rows[2]["gen_ref_acc"] < rows[1]["gen_ref_acc"]
    assert report.is_contamination_run(tmp_path / "gens") and not report.is_contamination_run(loop)
    shutil.copytree(loop / "gen_000", loop / "gen_002")  # the loop run grew: the grid would renumber cells
    with pytest.raises(RunError, match="holds another grid"):
        cli.run_contaminate(cfg, tmp_path / "gens")
    assert [p.name for p in report.draw([tmp_path / "gens"], tmp_path / "figures")] == [
        "bias_vs_generation.png"
    ]


def test_a_generator_trained_on_the_spot_is_trained_once(tmp_path):
    cfg = config(
        "generator.steps=2",
        "generator.options.block_out_channels=[8,16]",
        "generator.options.sample_steps=2",
        "modes.augment=[]",
        "modes.control=[]",
    )
    cli.run_contaminate(cfg, tmp_path / "spot")
    model = tmp_path / "spot" / "generator" / "seed_0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    assert (tmp_path / "spot" / "pools" / "spot_seed0.pt").exists()
    cli.run_contaminate(cfg, tmp_path / "spot")  # complete: nothing is retrained
    assert model.stat().st_mtime_ns == stamp


def test_one_generator_per_class_trained_on_the_spot_or_read_from_one_loop_run_per_class(tmp_path):
    tiny = ["modes.augment=[]", "modes.control=[]", "modes.substitute=[1.0]"]
    cfg = config(
        "generator.per_class=true",
        "generator.steps=1",
        "generator.options.block_out_channels=[8,16]",
        "generator.options.sample_steps=2",
        "+generator.options.train_timesteps=10",
        *tiny,
    )
    cli.run_contaminate(cfg, tmp_path / "spot")
    assert sorted(p.name for p in (tmp_path / "spot" / "generator" / "seed_0").iterdir()) == [
        f"class_{y:02d}.pt" for y in range(10)
    ]
    data = make_image("digits").load(generator=torch.Generator().manual_seed(0))
    dirs = []
    for y in range(10):  # an unconditional 'loop run' per class whose samples are that class's digits
        run = tmp_path / f"class_{y}"
        (run / "gen_000").mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        torch.save(data.train[:, data.train_labels[0] == y], run / "gen_000" / "samples.pt")
        dirs.append(str(run))
    cfg = config("contaminate/generator=run", f"generator.run_dirs=[{','.join(dirs)}]", *tiny)
    cli.run_contaminate(cfg, tmp_path / "runs")
    rows = results(tmp_path / "runs")
    assert rows[-1]["n_generated"] == rows[0]["n_train"]
    pool = torch.load(tmp_path / "runs" / "pools" / "gen_000.pt", weights_only=True)
    for y, n in enumerate(pool["need"].tolist()):  # class y's images are run y's first samples
        assert torch.equal(pool["images"][pool["labels"] == y], data.train[0, data.train_labels[0] == y][:n])


SPOT = (
    "generator.steps=2",
    "generator.options.block_out_channels=[8,16]",
    "generator.options.sample_steps=2",
)


def test_every_replicate_trains_its_own_generator_and_the_data_seed_stays_apart(tmp_path):
    only_substitute = ("modes.augment=[]", "modes.control=[]", "modes.substitute=[0.0,1.0]", "seeds=[0,1]")
    cfg = config(*SPOT, *only_substitute)
    cli.run_contaminate(cfg, tmp_path / "own")
    rows = results(tmp_path / "own")
    gen = [r for r in rows if r["ratio"] == 1.0]
    assert [(r["seed"], r["gen_seed"]) for r in gen] == [(0, 0), (1, 1)]
    assert sorted(p.name for p in (tmp_path / "own" / "generator").iterdir()) == ["seed_0", "seed_1"]
    pools = [torch.load(tmp_path / "own" / "pools" / f"spot_seed{g}.pt", weights_only=True) for g in (0, 1)]
    assert not torch.equal(pools[0]["images"], pools[1]["images"])  # two generators, two pools
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert any("generator" in c for c in summary["interval"]["covers"])
    assert "generator training" in (tmp_path / "own" / "summary.md").read_text().splitlines()[0]

    # one generator shared by both replicates (generator.seed): the interval no longer covers it
    cli.run_contaminate(config(*SPOT, *only_substitute, "generator.seed=7"), tmp_path / "shared")
    shared = results(tmp_path / "shared")
    assert [r["gen_seed"] for r in shared if r["ratio"] == 1.0] == [7, 7]
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert not any("generator" in c for c in summary["interval"]["covers"])
    # the generator's seed moves neither the real split, nor the test sets, nor the classifiers: every
    # real-only cell is the same classifier, and only the generated cells change
    for a, b in zip(rows, shared, strict=True):
        same = {k: a[k] for k in ("acc_clean", "acc_gaussian_noise", "n_train")} == {
            k: b[k] for k in ("acc_clean", "acc_gaussian_noise", "n_train")
        }
        assert same == (a["ratio"] == 0.0), (a["ratio"], a["acc_clean"], b["acc_clean"])


def _killed_in_generator_fit(cfg, path, fit: int, step: int, log: str) -> None:
    """Run the grid; SIGKILL this process after optimizer step `step` of this life's fit number `fit` of a
    spot generator (classifiers train through the same skeleton and are left alone). Logs every fit."""
    import simulator.models.training as training

    torch.set_num_threads(1)
    train, family_fit, fits = training.train, DiffusionFamily.fit, []

    def dies(s: int) -> None:
        if len(fits) == fit and s == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def logged_fit(self, *args, **kwargs):
        fits.append(1)
        with open(log, "a") as f:
            f.write(f"fit {len(fits)}\n")
        training.train = lambda *a, **k: train(*a, **k, on_step=dies)
        try:
            return family_fit(self, *args, **kwargs)
        finally:
            training.train = train

    DiffusionFamily.fit = logged_fit
    cli.run_contaminate(cfg, path)


KILL_GRID = (*SPOT, "modes.augment=[]", "modes.control=[]", "modes.substitute=[0.0,0.5]", "seeds=[0,1]",
             "generator.steps=6")  # fmt: skip


def same_generators_and_pools(a: Path, b: Path, gens: tuple[int, ...] = (0, 1)) -> None:
    for g in gens:
        x = torch.load(a / "generator" / f"seed_{g}" / "model.pt", weights_only=True)
        y = torch.load(b / "generator" / f"seed_{g}" / "model.pt", weights_only=True)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if torch.is_tensor(x[k]))
        pools = [torch.load(d / "pools" / f"spot_seed{g}.pt", weights_only=True) for d in (a, b)]
        assert torch.equal(pools[0]["images"], pools[1]["images"])


def test_a_grid_stopped_inside_a_generators_training_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    """An exception at step 3 of the first spot generator's fit (the in-process kill): no generator is
    left half-made under its name, and the resumed grid equals the uninterrupted one (SIGKILL: below)."""
    import simulator.models.training as training

    cfg = config(*KILL_GRID, "seeds=[0]")
    cli.run_contaminate(cfg, tmp_path / "whole")
    train, family_fit = training.train, DiffusionFamily.fit

    def dies(step: int) -> None:
        if step == 3:
            raise RuntimeError("killed")

    def fit_then_die(self, *args, **kwargs):
        monkeypatch.setattr(training, "train", lambda *a, **k: train(*a, **k, on_step=dies))
        return family_fit(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionFamily, "fit", fit_then_die)
    path = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="killed"):
        cli.run_contaminate(cfg, path)
    assert sorted(q.name for q in (path / "generator").iterdir()) == ["seed_0.tmp"]
    assert [r["cell"] for r in results(path)] == [0, 1] and (path / "gen_002.tmp").is_dir()
    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr(DiffusionFamily, "fit", family_fit)
    cli.run_contaminate(cfg, path)
    assert comparable(results(path)) == comparable(results(tmp_path / "whole"))
    same_generators_and_pools(tmp_path / "whole", path, gens=(0,))
    assert not list(path.glob("gen_*.tmp")) and not list((path / "generator").glob("*.tmp"))


@pytest.mark.slow  # ~10 s idle (30 s on 2 loaded cores): three lives in a forkserver and the whole grid
def test_a_sigkill_during_a_generators_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL inside the first spot generator's fit, then inside the second's (the first one finished),
    then a life to the end: the same rows, generators and pools as a grid never interrupted."""
    cfg = config(*KILL_GRID)
    cli.run_contaminate(cfg, tmp_path / "whole")
    path, log = tmp_path / "killed", tmp_path / "log.txt"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["simulator.contamination.cli", "tests.test_contamination_grid"])
    lives, seen = [], []
    for fit, step in [(1, 3), (2, 2), (0, -1)]:  # mid-fit of generator 0, mid-fit of generator 1, to the end
        p = ctx.Process(target=_killed_in_generator_fit, args=(cfg, path, fit, step, str(log)))
        p.start()
        p.join()
        lives.append(p.exitcode)
        seen.append(
            (sorted(q.name for q in (path / "generator").iterdir()), [r["cell"] for r in results(path)])
        )
        log.write_text(log.read_text() + "life\n")
    assert lives == [-signal.SIGKILL, -signal.SIGKILL, 0]
    # killed in generator 0's fit: its half-trained folder is a .tmp, no generator is complete; cells 0-2
    # (reference and the two real-only cells) were committed before it
    assert seen[0] == (["seed_0.tmp"], [0, 1, 2])
    assert seen[1] == (["seed_0", "seed_1.tmp"], [0, 1, 2, 3])  # generator 0 retrained whole, cell 3 done
    assert seen[2] == (["seed_0", "seed_1"], [0, 1, 2, 3, 4])
    fits = [life.strip().splitlines() for life in log.read_text().split("life\n")[:-1]]
    assert fits == [["fit 1"], ["fit 1", "fit 2"], ["fit 1"]]  # a killed fit restarts; a finished one stays
    assert comparable(results(path)) == comparable(results(tmp_path / "whole"))
    same_generators_and_pools(tmp_path / "whole", path)
    assert not list(path.glob("gen_*.tmp")) and not list((path / "generator").glob("*.tmp"))


def test_loop_run_replicates_give_each_replicate_its_own_loop_run(tmp_path):
    loops = [fake_loop_run(tmp_path / f"loop{i}") for i in range(2)]
    torch.save(  # run 1's generation-1 samples: other images than run 0's
        torch.load(loops[0] / "gen_001" / "samples.pt", weights_only=True).flip(-1),
        loops[1] / "gen_001" / "samples.pt",
    )
    cfg = config(
        "contaminate/generator=run",
        f"generator.replicates=[{loops[0]},{loops[1]}]",
        "seeds=[3,4]",
        "modes.augment=[]",
        "modes.control=[]",
        "modes.substitute=[1.0]",
    )
    cli.run_contaminate(cfg, tmp_path / "reps")
    rows = results(tmp_path / "reps")
    assert [(r["seed"], r["gen_seed"], r["gen_t"]) for r in rows if r["kind"] == "contaminated"] == [
        (3, 3, 1),
        (4, 4, 1),
    ]
    pools = [
        torch.load(tmp_path / "reps" / "pools" / f"gen_001_seed{s}.pt", weights_only=True) for s in (3, 4)
    ]
    assert torch.equal(pools[0]["images"].flip(-1), pools[1]["images"])
    with pytest.raises(ConfigError, match="generator.replicates"):
        cli.validate(config("contaminate/generator=run", f"generator.replicates=[{loops[0]}]", "seeds=[3,4]"))


def test_external_images_from_a_class_folder_or_an_npz_are_a_source(tmp_path):
    from PIL import Image

    data = make_image("digits").load(generator=torch.Generator().manual_seed(0))
    x, y = data.train[0][:300], data.train_labels[0][:300]
    for i, (img, label) in enumerate(zip(x, y, strict=True)):  # ImageFolder layout, 16x16 RGB files
        folder = tmp_path / "folder" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(img[0].numpy()).resize((16, 16), Image.Resampling.NEAREST).convert("RGB")
        big.save(folder / f"{i:04d}.png")
    np.savez(tmp_path / "gen.npz", images=x.permute(0, 2, 3, 1).numpy(), labels=y.numpy())

    pool = sources.load_external(tmp_path / "gen.npz", 10, (1, 8, 8))
    assert torch.equal(pool.images, x) and torch.equal(pool.labels, y)
    pool = sources.load_external(tmp_path / "folder", 10, (1, 8, 8))
    assert pool.images.shape == (300, 1, 8, 8) and sorted(pool.labels.tolist()) == sorted(y.tolist())
    # file 0000.png of its class folder, converted to grey and resized to 8x8 as PIL does it
    first = pool.images[pool.labels == int(y[0])][0]
    with Image.open(tmp_path / "folder" / str(int(y[0])) / "0000.png") as img:
        expected = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BICUBIC))
    assert torch.equal(first[0], torch.from_numpy(expected.copy()))

    tiny = ("modes.augment=[]", "modes.control=[]", "modes.substitute=[0.25]", "seeds=[0,1]")
    for source in ("folder", "gen.npz"):
        cfg = config("contaminate/generator=external", f"generator.path={tmp_path / source}", *tiny)
        cli.run_contaminate(cfg, tmp_path / f"run_{source}")
        rows = results(tmp_path / f"run_{source}")
        cell = [r for r in rows if r["ratio"] == 0.25]
        assert [r["gen_seed"] for r in cell] == [None, None] and all(r["n_generated"] > 0 for r in cell)
        summary = json.loads((tmp_path / f"run_{source}" / "summary.json").read_text())
        assert not any("generator" in c for c in summary["interval"]["covers"])
    with pytest.raises(ConfigError, match="generator.path: no such folder"):
        cli.validate(config("contaminate/generator=external", f"generator.path={tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(cli.ContaminationError, match="no class subfolders"):
        sources.load_external(tmp_path / "empty", 10, (1, 8, 8))


@pytest.mark.parametrize("experiment", ["digits_alpha", "digits_alpha_cnn", "colored_generations", "cifar10"])
def test_every_named_experiment_composes_and_validates(experiment, tmp_path):
    extra = (
        [f"generator.run_dir={fake_loop_run(tmp_path / 'loop')}"]
        if experiment == "colored_generations"
        else []
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("contaminate", overrides=[f"contaminate/experiment={experiment}", *extra])
    cli.validate(cfg)
    assert cfg.name == experiment and cfg.task == "contaminate"


def test_the_loop_and_the_grid_read_the_same_coloured_digits_through_the_registry():
    """experiments/contamination/loop_colored.py trains its generators on configs/data/colored_digits.yaml
    and the grid's classifiers read configs/contaminate/data/colored_digits.yaml: the same block, loaded by
    the same registry factory, so the classifiers see the images the generators were trained on."""
    from simulator import registry
    from tests.conftest import compose_config

    loop = compose_config("data=colored_digits")
    grid_cfg = config("contaminate/data=colored_digits")
    assert OmegaConf.to_container(loop.data) == OmegaConf.to_container(grid_cfg.data)
    assert "colored_digits" in registry.source_names() and "colored_digits" in cli.sources()
    ours = cli.load_data(grid_cfg)
    theirs = registry.make_data(OmegaConf.create({"data": OmegaConf.to_container(loop.data), "chains": 1,
                                                  "seed": grid_cfg.seed}))  # fmt: skip
    assert torch.equal(ours.train, theirs.train) and torch.equal(ours.train_attrs, theirs.train_attrs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["modes.substitute=[0.5,1.5]"], "modes.substitute: alpha must be a number in [0, 1], got 1.5"),
        (["modes.control=[-0.2]"], "modes.control: alpha must be"),
        (["modes.augment=[-1]"], "modes.augment: r must be a finite number >= 0, got -1"),
        (
            ["contaminate/generator=run", "generator.run_dir=/no/such/run"],
            "generator.run_dir: no such run directory",
        ),
        (["contaminate/generator=run"], "generator.run_dir: a loop run directory is needed"),
        (["modes.generations=[0.5]"], "modes.generations: needs generator.kind=run"),
        (["eval.shifts=[fog]"], "eval.shifts: unknown shift 'fog'"),
        (["seeds=[]"], "seeds: must be a non-empty list"),
        (["eval.severity=[1,6]"], "eval.severity: must be an integer in [1, 5] or a list"),
        (["split.fraction=1.0"], "split.fraction: 1.0 leaves no held-out real images for modes.control"),
        (["generator.seed=-1"], "generator.seed: must be an integer >= 0 or null"),
        (["classifier.seed=x"], "classifier.seed: must be an integer >= 0 or null"),
        (["eval.baselines=[{arch: mlp, steps: 5}]", "seeds=[0]"], "effective robustness needs >= 6"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        cli.validate(config(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_default_control_is_plain_held_out_real_images_and_a_blurred_one_is_an_option():
    data = cli.load_data(config())
    setups = {}
    for name in ("heldout", "blurred"):
        cfg = config(f"contaminate/control={name}")
        setups[name] = grid.prepare(
            data,
            seed=cfg.seed,
            split_fraction=cfg.split.fraction,
            control_shift=cfg.control.shift,
            control_severity=cfg.control.severity,
            shift_names=[],
            severity=1,
        )
    plain, blurred = setups["heldout"], setups["blurred"]
    real = {tuple(x.flatten().tolist()) for x in plain.real.images}
    # Hataya et al.'s control: real training images the classifier never sees, unchanged
    assert all(any(torch.equal(x, f) for f in plain.full.images) for x in plain.reserve.images[:50])
    assert not any(tuple(x.flatten().tolist()) in real for x in plain.reserve.images)
    assert torch.equal(blurred.reserve.labels, plain.reserve.labels)
    assert not torch.equal(blurred.reserve.images, plain.reserve.images)


def test_a_reserve_too_small_for_the_control_is_refused_before_any_cell(tmp_path):
    cfg = config("split.fraction=0.9", "modes.substitute=[]", "modes.augment=[]", "modes.control=[1.0]")
    with pytest.raises(cli.ContaminationError, match="modes.control: alpha 1 needs .* held-out real images"):
        cli.run_contaminate(cfg, tmp_path / "short")
    assert not list((tmp_path / "short").glob("gen_*"))


def test_a_generation_the_loop_has_not_committed_is_an_error(tmp_path):
    loop = fake_loop_run(tmp_path / "loop")
    with pytest.raises(ConfigError, match="generator.generation: generation 7 is not committed"):
        cli.validate(
            config("contaminate/generator=run", f"generator.run_dir={loop}", "generator.generation=7")
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a loop run directory"):
        cli.validate(config("contaminate/generator=run", f"generator.run_dir={tmp_path / 'empty'}"))


def test_the_command_line_reports_a_missing_run_directory_in_one_line_and_writes_nothing(tmp_path):
    code = "from simulator.contamination.cli import simulate_contaminate; simulate_contaminate()"
    args = ["contaminate/generator=run", "generator.run_dir=/no/such/run", f"run_root={tmp_path / 'runs'}"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: generator.run_dir: no such run directory: /no/such/run"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_cifar10_configuration_runs_a_two_cell_smoke_grid_on_cpu(tmp_path, shared_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "contaminate",
            overrides=[
                "contaminate/experiment=cifar10",
                "contaminate/debug=smoke",
                f"data.options.root={shared_dir / 'data'}",
                "device=cpu",
            ],
        )
    cli.run_contaminate(cfg, tmp_path / "cifar")
    rows = results(tmp_path / "cifar")
    assert [(r["kind"], r["mode"], r["ratio"]) for r in rows] == [
        ("reference", "substitute", 0.0),
        ("contaminated", "substitute", 0.5),
    ]
    assert rows[0]["arch"] == "resnet18" and rows[1]["n_generated"] + rows[1]["n_real"] == rows[0]["n_train"]
    assert abs(rows[1]["n_generated"] - rows[0]["n_train"] / 2) <= 5  # round(n_y / 2) per class
    assert {"acc_clean", "acc_grayscale", "acc_jpeg", "gen_ref_acc"} <= set(rows[1])
