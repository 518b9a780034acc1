"""Bad input to the three commands: one line on stderr naming the field, exit code 2, nothing written.

Each case runs the command's console entry function in this process (sys.argv set, SystemExit caught),
from an empty working directory (run_root=runs is relative to it), and checks that the file tree there
is unchanged. A few cases run the installed console scripts as real processes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator import cli, report_cli
from simulator.contamination import cli as contaminate_cli

TINY = ["debug=tiny", "model.options.blocks=2", "model.options.hidden=16"]
ONE = ["experiment=single", *TINY]  # a single run of the default model on two_moons
BASE = ["experiment=single", "debug=tiny"]  # for families other than flow
DIGITS = [*BASE, "data=digits", "model=glow", "eval=digits"]
PRE = [*BASE, "data=digits", "model=diffusion_tiny", "eval.metrics=[]", "eval.stability_metric=null"]

# (arguments after ONE unless they start with "experiment=", the start of the one line)
SIMULATE = [
    # another model without experiment=: the default experiment's spline-flow options, and what to add
    (
        [*TINY, "model=categorical", "data=tokens"],
        "model.options.blocks: unknown option; allowed: smoothing, top_k, top_p, vocab (the default "
        "experiment=regimes_2d sets them for its spline flow; add experiment=single)",
    ),
    # the examples
    (["policy=mix", "policy.lam=inf"], "policy.lam: must be a finite number >= 0, got inf"),
    (["model.options.lr=-1"], "model.options.lr: must be a finite number >= 0, got -1"),
    (["model.options.blocks=0"], "model.options.blocks: must be an integer >= 1, got 0"),
    (["eval.options.projections=-1"], "eval.options.projections: must be an integer >= 1 or null, got -1"),
    (["init.checkpoint={files}/text.pt"], "init.checkpoint: {files}/text.pt is not a readable tensors-only"),
    (["init.checkpoint={files}/truncated.pt"], "init.checkpoint: {files}/truncated.pt is not a readable"),
    (
        ["init.checkpoint={files}/gaussian.pt"],
        "init.checkpoint: {files}/gaussian.pt does not fit model.family=flow",
    ),
    (["init.checkpoint={files}/flow_blocks3.pt"], "init.checkpoint: {files}/flow_blocks3.pt does not fit"),
    (["run_root={files}/text.pt/runs"], "run_root: cannot create or write"),
    (
        ["policy=fresh", "policy.n_real=100000"],
        "policy.n_real=100000 exceeds the real training set (200 rows)",
    ),
    ([*DIGITS, "sample.curation_k=2", "sample.curation_reward=truth"], "sample.curation_reward: truth needs"),
    (["eval.stability_metric=nope"], "eval.stability_metric: 'nope' is not written by eval.metrics"),
    (["eval.metrics=[]"], "eval.stability_metric: 'kl_truth' is not written by eval.metrics []"),
    (["experiment=single", "debug=tiny", "data=digits", "model=glow"], "eval.metrics: kl_truth needs"),
    (["eval.options.k=0"], "eval.options.k: must be an integer >= 1 or null, got 0"),
    (["model.options.batch_size=0"], "model.options.batch_size: must be an integer >= 1, got 0"),
    (["sample.temperature=inf"], "sample.temperature: must be a finite number > 0, got inf"),
    (["+sample.tempreature=0.5"], "sample.tempreature: unknown key (nothing reads it)"),
    (
        [*BASE, "model=gmm", "model.options.components=2.5"],
        "model.options.components: must be an integer >= 1, got 2.5",
    ),
    (["model.options.hidden=0"], "model.options.hidden: must be an integer >= 1, got 0"),
    (["name=../../x"], "name: must be a folder name inside run_root"),
    # checkpoints
    (
        ["init.checkpoint={files}/tensor.pt"],
        "init.checkpoint: {files}/tensor.pt does not hold a model state dict",
    ),
    (
        ["init.checkpoint={files}/empty.pt"],
        "init.checkpoint: {files}/empty.pt does not hold a model state dict",
    ),
    (
        ["init.checkpoint={files}/pickled.pt"],
        "init.checkpoint: {files}/pickled.pt is not a readable tensors-only",
    ),
    (["init.checkpoint={files}/nope.pt"], "init.checkpoint: file not found"),
    # unknown keys and options
    (["+foo=1"], "foo: unknown key"),
    (["+eval.nope=1"], "eval.nope: unknown key"),
    (["+train.stpes=5"], "train.stpes: unknown key"),
    (["+model.options.nope=1"], "model.options.nope: unknown option; allowed:"),
    (["+eval.options.nope=1"], "eval.options.nope: unknown option; allowed:"),
    (["+model.options.chains=2"], "model.options.chains: set by the program"),
    (["generatons=3"], "command line: Could not override 'generatons'"),
    (["policy=nope"], "command line: In 'config': Could not find 'policy/nope'"),
    (["policy=mix=3,"], "command line: mismatched input"),
    # types and bounds
    (["model.options.lr=nan"], "model.options.lr: must be a finite number >= 0, got nan"),
    (["model.options.lr=true"], "model.options.lr: must be a finite number >= 0, got True"),
    (["model.options.layers=two"], "model.options.layers: must be an integer >= 1, got 'two'"),
    (["+model.options.grad_clip=-1"], "model.options.grad_clip: must be a finite number >= 0 or null"),
    (["+model.options.actnorm=3"], "model.options.actnorm: must be true or false, got 3"),
    (
        [*BASE, "model=kde", "model.options.bandwidth=0"],
        "model.options.bandwidth: must be a finite number > 0",
    ),
    (
        [*BASE, "model=gaussian", "model.options.ddof=-1"],
        "model.options.ddof: must be an integer in [0, 1], got -1",
    ),
    (["model.options.arch=nope"], "model.options.arch: must be one of realnvp, nsf, got 'nope'"),
    (["model.family=nope"], "model.family: must be one of"),
    (["generations=0"], "generations: must be an integer >= 1"),
    (["generations=2.5"], "generations: must be an integer >= 1, got 2.5"),
    (["seed=-1"], "seed: must be an integer >= 0"),
    (["chains=0"], "chains: must be an integer >= 1"),
    (["chains=4"], "chains: must be 1 (model.family=flow runs one chain per run"),
    (["device=tpu"], "device: must be one of"),
    (["durable=maybe"], "durable: must be true or false"),
    (["progress=2"], "progress: must be true or false"),
    (["threads=0"], "threads: must be an integer >= 1"),
    (["share_gen0=sometimes"], "share_gen0: must be true or false"),
    (["train.epochs=-1"], "train.epochs: must be a finite number > 0"),
    (["train.steps=0"], "train.steps: must be an integer >= 1"),
    (["train.warmup=-1"], "train.warmup: must be an integer >= 0"),
    (["train.ema=sometimes"], "train.ema: must be one of carry, restart"),
    (["sample.curation_k=0"], "sample.curation_k: must be an integer >= 1"),
    (["sample.n=0"], "sample.n: must be an integer >= 1"),
    (["sample.guidance=1"], "sample.guidance: model.family=flow has no classifier-free guidance"),
    (["data.n_train=0"], "data.n_train: must be an integer >= 1"),
    (["data.source=nope"], "data.source: must be one of"),
    (["eval.n_samples=0"], "eval.n_samples: must be an integer >= 1"),
    (["eval.metrics=[nope]"], "eval.metrics: unknown metric 'nope'"),
    (
        ["eval.metrics=[fid]", "eval.stability_metric=fid"],
        "eval.metrics: fid (inception FID) needs image data",
    ),
    (["eval.metrics=[bpd]", "eval.stability_metric=bpd"], "eval.metrics: bpd (bits per dimension"),
    (["policy=mix", "policy.weight_real=2"], "policy.weight_real: must be a finite number in [0, 1] or null"),
    (["+policy.weight_real=0.5"], "policy.weight_real: only for policies with a real and a synthetic part"),
    (["policy=accumulate_subsample", "policy.budget=0"], "policy.budget: must be an integer >= 1"),
    (["policy=fresh", "policy.source=truth", "data=digits"], "policy.source=truth: needs a data source"),
    (
        [*BASE, "data=image_folder", "data.options.root={files}/images", "model=glow", "eval=image"],
        "data (image_folder): cannot identify image file",
    ),
    (
        [*DIGITS, "model=diffusion_tiny", "model.options.label_dropout=1.5"],
        "model.options.label_dropout: must be a finite number in [0, 1) or null, got 1.5",
    ),  # fmt: skip
    # sweeps: every job is checked before the first runs
    (["-m", "policy=mix", "policy.lam=0.5,-1"], "policy.lam: must be a finite number >= 0, got -1"),
    (
        ["-m", "policy=fresh", "policy.n_real=300", "data.n_train=500,200"],
        "policy.n_real=300 exceeds the real training set (200 rows)",
    ),  # fmt: skip
    ([*TINY, "model.options.hidden=0"], "model.options.hidden: must be an integer >= 1, got 0"),  # regimes_2d
    ([*TINY, "data=digits"], "eval.metrics: kl_truth needs"),  # the default sweep (regimes_2d) on digits
    # sizes against the machine (issue 17): what the options ask for, refused before any directory exists
    (["policy=mix", "policy.lam=1e30"], "policy.lam: each generation draws 2e+32 samples of 8 bytes"),
    (["policy=mix", "policy.lam=1e308"], "policy.lam: overflows the number of synthetic rows"),
    (["sample.n=1000000000000000"], "sample.n: each generation draws 1e+15 samples"),
    (["eval.n_samples=1000000000000000"], "eval.n_samples: each generation draws 1e+15 samples"),
    (["sample.curation_k=1000000000000000"], "sample.curation_k: each generation draws 1,000 samples"),
    (["policy=accumulate", "generations=1000000000000"], "generations: the training set of generation"),
    (
        ["policy=accumulate_subsample", "generations=1000000000000"],
        "generations: generation 1000000000000's draw of 200 rows from 200,000,000,000,200",
    ),
    (["train.epochs=1e308"], "train.epochs: 1e+308 passes over 200 rows overflow the number of"),
    (["eval.options.projections=1000000000000"], "eval.options.projections: the sliced_w metric's float64"),
    (["eval.n_samples=10000000"], "eval.n_samples: the mmd metric's float64 matrices"),
    (["data.options.noise=1e308"], "data.options.noise: overflows data.source=two_moons's arithmetic"),
    (["data.options.noise=1e-300"], "data.options.noise: overflows data.source=two_moons's arithmetic"),
    (["data.options.noise=1e150"], "data.options.noise: data.source=two_moons gives non-finite"),
    (["data.n_train=1000000000000"], "data.n_train: loading data.source=two_moons allocates"),
    (
        [*BASE, "data=gaussian", "model=gaussian", "chains=1000000000000"],
        "chains: loading data.source=gaussian allocates",
    ),
    (["model.options.hidden=10000000"], "model.options.hidden: building model.family=flow allocates"),
    (
        [*PRE, "++model.options.train_timesteps=10000000"],
        "model.options.train_timesteps: must be an integer in [2, 1e+06], got 10000000",
    ),
    # init.pretrained (issue 17): each field of the directory's configs, before any work
    (
        [*PRE, "init.pretrained={files}/pre/pickle"],
        "init.pretrained: cannot read {files}/pre/pickle/unet/diffusion_pytorch_model.safetensors as "
        "tensors only (SafetensorError",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/truncated"],
        "init.pretrained: cannot read {files}/pre/truncated/unet/diffusion_pytorch_model.safetensors",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/timesteps"],
        "init.pretrained: num_train_timesteps: must be an integer in [2, 1e+06], got 1000000000000.0 "
        "(in {files}/pre/timesteps/scheduler/scheduler_config.json)",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/unet_timesteps"],
        "init.pretrained: num_train_timesteps: must be an integer in [1, 1e+06] or null, got "
        "1000000000000 (in {files}/pre/unet_timesteps/unet/config.json)",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/wide"],
        "init.pretrained: block_out_channels [200000, 400000] of {files}/pre/wide/unet/config.json make "
        "a UNet of 27,160,037,800,001 parameters",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/widths"],
        "init.pretrained: {files}/pre/widths/unet/diffusion_pytorch_model.safetensors does not match "
        "{files}/pre/widths/unet/config.json",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/beta"],
        "init.pretrained: beta_start: must be a finite number in [0, 1), got 2.0 "
        "(in {files}/pre/beta/scheduler/scheduler_config.json)",
    ),
    ([*PRE, "init.pretrained={files}/pre/beta_order"], "init.pretrained: beta_start: must be <= beta_end"),
    (
        [*PRE, "init.pretrained={files}/pre/schedule"],
        "init.pretrained: beta_schedule: must be one of linear, scaled_linear, squaredcos_cap_v2, got "
        "'cubic'",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/text"],
        "init.pretrained: block_out_channels: must be a list of integers >= 1, got ['a', 16]",
    ),
    (
        [*PRE, "init.pretrained={files}/pre/layers"],
        "init.pretrained: layers_per_block: must be an integer >= 1, got 'two'",
    ),
    ([*PRE, "init.pretrained={files}/pre/groups"], "init.pretrained: norm_num_groups: must divide every"),
    (
        [*PRE, "init.pretrained={files}/pre/blocks"],
        "init.pretrained: down_block_types: must name one block per width of block_out_channels (2), got 3",
    ),
]
if Path("/proc/self").is_dir():  # Linux: a folder nothing can be made in, whatever the permission bits say
    SIMULATE.append((["run_root=/proc/x"], "run_root: cannot create folders in /proc, so not /proc/x"))
try:  # launcher=slurm needs the [sweep] extra; without it the line says which extra to install
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401
except ImportError:
    SIMULATE.append(
        (
            ["launcher=slurm"],
            "command line: In 'hydra/config': Could not find 'hydra/launcher/submitit_slurm' "
            '(launcher=slurm needs the sweep extra: pip install -e ".[sweep]")',
        )
    )

CONTAMINATE = [
    (["+classifier.foo=1"], "classifier.foo: unknown key"),
    (["classifier.lr=-1"], "classifier.lr: must be a finite number > 0, got -1"),
    (["classifier.steps=2.5"], "classifier.steps: must be an integer >= 1, got 2.5"),
    (["classifier.hidden=[0]"], "classifier.hidden: must be a list of integers >= 1, got [0]"),
    (["classifier.arch=nope"], "classifier.arch: must be one of"),
    (
        ["seeds=[0,1,2,3,4]", "eval.baselines=[{{arch:mlp,steps:0}}]"],
        "eval.baselines[0].steps: must be an integer >= 1",
    ),
    (
        ["seeds=[0,1,2,3,4]", "eval.baselines=[{{arch:mlp,lr:inf}}]"],
        "eval.baselines[0].lr: must be a finite number > 0",
    ),
    (["seeds=[0,0]"], "seeds: must be a non-empty list of distinct integers"),
    (["name=../x"], "name: must be a folder name inside run_root"),
    (["run_root={files}/text.pt"], "run_root: {files}/text.pt exists and is not a folder"),
    (["generator.options.lr=-1"], "generator.options.lr: must be a finite number > 0, got -1"),
    (["+generator.options.nope=1"], "generator.options.nope: unknown option"),
    (["generator.family=nope"], "generator.family: must be one of"),
    (
        ["contaminate/generator=external", "generator.path={files}/few.npz"],
        "generator.path: holds 2 images of class 0, the grid needs",
    ),  # fmt: skip
    (["contaminate/generator=run"], "generator.run_dir: a loop run directory is needed"),
    (
        ["contaminate/generator=run", "generator.run_dir={files}"],
        "generator.run_dir: {files} is not a loop run",
    ),
    (
        ["contaminate/generator=run", "generator.run_dir={files}/colored_loop"],
        "generator.run_dir: {files}/colored_loop was trained on data.source=colored_digits (images (3,",
    ),
    (["modes.control=[1.0]", "split.fraction=0.9"], "modes.control: alpha 1 needs"),
    (["split.fraction=1.5"], "split.fraction: must be a finite number in (0, 1]"),
    (["control.severity=9"], "control.severity: must be an integer in [1, 5]"),
    (["eval.shifts=[nope]"], "eval.shifts: unknown shift 'nope'"),
    (["+modes.nope=[0.5]"], "modes.nope: unknown key"),
    (["modes.replace=[1.5]"], "modes.replace: renamed to modes.substitute"),
    (["modes.substitute=[1.5]"], "modes.substitute: alpha must be a number in [0, 1], got 1.5"),
    (["eval.shifts=[cifar10c:fog:3]"], "eval.cifar10c_root: cifar10c:fog needs its folder"),
    (["eval.shifts=[cifar10.1]", "eval.cifar10_1_root={files}"], "cifar10.1_v6_data.npy: no such file"),
    (["-m", "classifier.lr=0.001,-1"], "classifier.lr: must be a finite number > 0, got -1"),
]

REPORT = [
    (["{cwd}/nope"], "{cwd}/nope: no such directory"),
    (["{cwd}/empty"], "{cwd}/empty: no run directory (results.jsonl) in it"),
    ([], "simulate-report: the following arguments are required: dirs"),
    (["--nope", "{cwd}/empty"], "simulate-report: unrecognized arguments: --nope"),
    (["{files}/text.pt"], "{files}/text.pt: no such directory"),
    (["{cwd}/empty", "--metric"], "simulate-report: argument --metric: expected one argument"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Files the cases point at, outside the working directory whose tree is compared."""
    from simulator.models.flow import FlowFamily

    d = tmp_path_factory.mktemp("inputs")
    (d / "text.pt").write_text("not a checkpoint\n")
    torch.save(FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=16).state_dict(), d / "flow.pt")
    (d / "truncated.pt").write_bytes((d / "flow.pt").read_bytes()[:300])
    torch.save(
        FlowFamily(chains=1, event_shape=(2,), blocks=3, hidden=16).state_dict(), d / "flow_blocks3.pt"
    )
    torch.save({"mean": torch.zeros(1, 2), "cov": torch.eye(2)[None]}, d / "gaussian.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({}, d / "empty.pt")
    torch.save({"args": argparse.Namespace(a=1)}, d / "pickled.pt")
    for label in ("cat", "dog"):  # undecodable images in an ImageFolder layout
        (d / "images" / label).mkdir(parents=True)
        (d / "images" / label / "0.png").write_text("not a png\n")
    loop = d / "colored_loop"  # a loop run (generations 0 and 1) of coloured, 3-channel digits
    for t in (0, 1):
        (loop / f"gen_{t:03d}").mkdir(parents=True)
    (loop / "config.yaml").write_text(
        "data: {source: colored_digits, n_train: null, n_test: null, options: {}}\n"
        "model: {family: diffusion, options: {}}\nchains: 1\n"
    )
    (loop / "results.jsonl").write_text('{"generation": 0}\n{"generation": 1}\n')
    np.savez(d / "few.npz", images=np.zeros((20, 8, 8, 1), np.uint8), labels=np.arange(20) % 10)
    pretrained_dirs(d / "pre")
    return d


def pretrained_dirs(d: Path) -> None:
    """A tiny diffusers pipeline (unet/ + scheduler/) and copies of it with one thing wrong each."""
    import json
    import shutil

    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=None)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=40)).save_pretrained(d / "ok")
    unet_json, scheduler_json = "unet/config.json", "scheduler/scheduler_config.json"
    changes = {
        "timesteps": (scheduler_json, {"num_train_timesteps": 1e12}),  # 4 TB of betas
        "unet_timesteps": (unet_json, {"num_train_timesteps": 10**12}),
        "wide": (unet_json, {"block_out_channels": [200000, 400000]}),  # hundreds of TB of parameters
        "widths": (unet_json, {"block_out_channels": [8, 32]}),  # the weights are (8, 16)
        "beta": (scheduler_json, {"beta_start": 2.0}),
        "beta_order": (scheduler_json, {"beta_start": 0.03, "beta_end": 0.02}),
        "schedule": (scheduler_json, {"beta_schedule": "cubic"}),
        "text": (unet_json, {"block_out_channels": ["a", 16]}),
        "layers": (unet_json, {"layers_per_block": "two"}),
        "groups": (unet_json, {"norm_num_groups": 5}),
        "blocks": (unet_json, {"down_block_types": ["DownBlock2D"] * 3}),
    }
    for name, (part, values) in changes.items():
        shutil.copytree(d / "ok", d / name)
        path = d / name / part
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    weights = "unet/diffusion_pytorch_model.safetensors"
    shutil.copytree(d / "ok", d / "pickle")  # a pickle saved under the safetensors name
    torch.save({"args": argparse.Namespace(a=1)}, d / "pickle" / weights)
    shutil.copytree(d / "ok", d / "truncated")
    (d / "truncated" / weights).write_bytes((d / "ok" / weights).read_bytes()[:500])


def tree(path: Path) -> dict[str, bytes | None]:
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in path.rglob("*")}


def run_entry(entry, prog: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [prog, *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        entry()
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def check(code: int, lines: list[str], message: str, before: dict, after: dict) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert after == before, "a refused command must not write anything"


def fill(items: list[str], **paths: Path) -> list[str]:
    return [s.format(**{k: str(v) for k, v in paths.items()}) for s in items]


def ids(cases: list) -> list[str]:
    return [" ".join(args)[-80:] or "(none)" for args, _ in cases]


def test_at_least_60_distinct_cases():
    keys = [(name, tuple(args)) for name, cases in (("s", SIMULATE), ("c", CONTAMINATE), ("r", REPORT))
            for args, _ in cases]  # fmt: skip
    assert len(set(keys)) == len(keys) >= 60


@pytest.mark.parametrize("args,message", SIMULATE, ids=ids(SIMULATE))
def test_simulate(tmp_path, files, monkeypatch, capsys, args, message):
    head = [] if any(a.startswith("experiment=") for a in args) or args[: len(TINY)] == TINY else ONE
    if args and args[0] == "-m":
        head = ONE
    argv = fill([*head, *args], files=files)
    (tmp_path / "runs").mkdir()  # an existing run_root must stay as it is too
    before = tree(tmp_path)
    code, lines = run_entry(cli.simulate, "simulate", argv, tmp_path, monkeypatch, capsys)
    check(code, lines, fill([message], files=files)[0], before, tree(tmp_path))


@pytest.mark.parametrize("args,message", CONTAMINATE, ids=ids(CONTAMINATE))
def test_simulate_contaminate(tmp_path, files, monkeypatch, capsys, args, message):
    argv = fill(["contaminate/debug=tiny", *args], files=files)
    before = tree(tmp_path)
    code, lines = run_entry(
        contaminate_cli.simulate_contaminate, "simulate-contaminate", argv, tmp_path, monkeypatch, capsys
    )
    check(code, lines, fill([message], files=files)[0], before, tree(tmp_path))


@pytest.mark.parametrize("args,message", REPORT, ids=ids(REPORT))
def test_simulate_report(tmp_path, files, monkeypatch, capsys, args, message):
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    argv = fill(args, files=files, cwd=tmp_path)
    report = report_cli.simulate_report
    code, lines = run_entry(report, "simulate-report", argv, tmp_path, monkeypatch, capsys)
    check(code, lines, fill([message], files=files, cwd=tmp_path)[0], before, tree(tmp_path))


def test_refused_at_the_job_leaves_no_directory(tmp_path, files, monkeypatch, capsys):
    """Past the preflight (hydra's own entry, as a launcher runs a job): the job's boundary refuses the
    same input in one line and removes the directories hydra made for it."""
    argv = [*ONE, "model.options.hidden=0"]
    code, lines = run_entry(cli._simulate, "simulate", argv, tmp_path, monkeypatch, capsys)
    check(code, lines, "model.options.hidden: must be an integer >= 1, got 0", {}, tree(tmp_path))


API = [
    ({"policy": "mix", "policy.lam": 1e30}, "policy.lam: each generation draws 2e+32 samples"),
    ({"data.options.noise": 1e308}, "data.options.noise: overflows data.source=two_moons's arithmetic"),
    pytest.param(
        {"run_root": "/proc/x"},
        "run_root: cannot create folders in /proc",
        marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux's /proc"),
    ),
]


@pytest.mark.parametrize("overrides,message", API)
def test_python_api_refuses_in_one_line(tmp_path, monkeypatch, overrides, message):
    """simulator.run: the same preflight, the same one line (a ConfigError), nothing made."""
    import simulator
    from simulator.config import ConfigError

    monkeypatch.chdir(tmp_path)
    base = {"experiment": "single", "debug": "tiny", "model.options.blocks": 2, "model.options.hidden": 16}
    with pytest.raises(ConfigError) as err:
        simulator.run({**base, **overrides})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert tree(tmp_path) == {}


def script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.mark.parametrize(
    "command,args,message",
    [
        pytest.param(
            "simulate",
            [*ONE, "+sample.tempreature=0.5"],
            "sample.tempreature: unknown key",
            marks=pytest.mark.slow,
        ),  # fmt: skip
        pytest.param(
            "simulate-contaminate",
            ["classifier.lr=-1"],
            "classifier.lr: must be a finite number > 0",
            marks=pytest.mark.slow,
        ),  # fmt: skip
        ("simulate-report", ["nope"], "nope: no such directory"),
    ],
)
def test_console_scripts(tmp_path, command, args, message):
    if not Path(script(command)).exists():
        pytest.skip(f"{command} is not installed next to {sys.executable}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([script(command), *args], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    lines = out.stderr.strip().splitlines()
    check(out.returncode, lines, message, {}, tree(tmp_path))
