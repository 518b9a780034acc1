"""The command line: the default config composes, a tiny run finishes, bad input is one line and exit 2."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simulator.rundir import RunDir
from tests.conftest import compose_config

TINY = ["debug=tiny", "model.options.blocks=2", "model.options.hidden=16"]


def simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from simulator.cli import simulate; simulate()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_default_config_composes():
    cfg = compose_config()
    assert cfg.model.family == "flow" and cfg.data.source == "two_moons" and cfg.generations >= 1


def test_tiny_single_run(tmp_path):
    out = simulate("experiment=single", *TINY, "policy=mix", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "default-tiny" / "model.options.blocks=2,model.options.hidden=16,policy=mix"
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert not (run / "figures").exists()  # debug=tiny switches figures off
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["policy"] == {"name": "mix", "lam": 0.5, "weight_real": None}


def test_default_sweep_draws_the_comparison(tmp_path):
    out = simulate(*TINY, "generations=2", "eval.figures=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    sweep = tmp_path / "runs" / "regimes_2d-tiny"
    runs = {tuple(p.name.split(",")[-2:]) for p in sweep.iterdir() if (p / "results.jsonl").exists()}
    policies = ("accumulate", "mix_high", "mix_low", "replace", "real_only")
    assert runs == {(f"policy={p}", f"seed={s}") for p in policies for s in range(3)}  # 5 regimes x 3 seeds
    assert len(list((sweep / "_gen0").glob("*/n*/model.safetensors"))) == 3  # one generation 0 per seed
    assert (sweep / "figures" / "stability.png").stat().st_size > 0
    replace = sweep / "model.options.blocks=2,model.options.hidden=16,policy=replace,seed=0"
    assert (replace / "figures" / "samples.png").stat().st_size > 0
    table = (sweep / "figures" / "regimes.csv").read_text()
    assert "real only (λ=0)" in table and "mix λ=0.25" in table and "replace" in table
    assert table.count("real-only floor") == 4  # every other regime is judged against the floor


# caught by the preflight check of the command line (before hydra starts)
BAD = [
    (["model.family=nope"], "model.family: must be one of"),
    (["policy.name=nope"], "policy.name: must be one of"),
    (["policy=mix", "policy.lam=-1"], "policy.lam: must be a finite number >= 0"),
    (["policy=mix", "policy.lam=inf"], "policy.lam: must be a finite number >= 0, got inf"),
    (["sample.temperature=inf"], "sample.temperature: must be a finite number > 0"),
    (["name=../../escaped"], "name: must be a folder name inside run_root"),
    (["generations=0"], "generations: must be an integer >= 1"),
    (["chains=0"], "chains: must be an integer >= 1"),
    (["data.source=nope"], "data.source: must be one of"),
    (["init.checkpoint=/no/such/model.pt"], "init.checkpoint: file not found"),
    (["sample.temperature=0"], "sample.temperature: must be a finite number > 0"),
    (["eval.metrics=[nope]"], "eval.metrics: unknown metric"),
    (["generatons=3"], "command line: Could not override 'generatons'"),
    (["policy=nope"], "command line: In 'config': Could not find 'policy/nope'"),
    (["policy=mix=3,"], "command line: mismatched input"),
    (["-m", "policy=mix", "policy.lam=0.5,-1"], "policy.lam: must be a finite number >= 0, got -1"),
    (["eval=image", "eval.options.weights_path=/no/weights.pth"], "eval.metrics: fid (inception FID) needs"),
    (["data=digits", "eval=image", "eval.options.weights_path=/no/weights.pth"], "eval.options.weights_path"),
    (["durable=maybe"], "durable: must be true or false"),
    (["threads=0"], "threads: must be an integer >= 1"),
    (["train.epochs=-1"], "train.epochs: must be a finite number > 0"),
]
# caught when the run starts (they need the data's shape or the machine): the real command line
BAD_AT_START = [
    (["model.options.arch=nope"], "model.options.arch: must be one of realnvp, nsf, got 'nope'"),
    (["chains=4"], "chains: must be 1 (model.family=flow runs one chain per run"),
    (["+model.options.nope=1"], "model.options.nope: unknown option"),
    (["device=cuda"] if not __import__("torch").cuda.is_available() else ["device=tpu"], "device"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    from simulator.cli import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        preflight(["experiment=single", *TINY, *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert tree(tmp_path) == {}, "a bad command must not write anything"


@pytest.mark.parametrize("args,message", BAD_AT_START, ids=[b[1] + " " + b[0][0] for b in BAD_AT_START])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = simulate("experiment=single", *TINY, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert tree(tmp_path) == {}, "a bad command must not write anything"


def test_run_made_by_another_config_is_refused(tmp_path):
    run = tmp_path / "runs" / "default-tiny" / "model.options.blocks=2,model.options.hidden=16,policy=mix"
    assert simulate("experiment=single", *TINY, "policy=mix", cwd=tmp_path).returncode == 0
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["policy"]["lam"] = 0.75  # as if the config file had been edited since
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    before = tree(run)
    out = simulate("experiment=single", *TINY, "policy=mix", cwd=tmp_path)
    assert out.returncode == 2 and "made by another config" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert {k: v for k, v in tree(run).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_lambda_by_seed_sweep_and_report(tmp_path):
    out = simulate("-m", "experiment=single", *TINY, "policy=mix", "policy.lam=0.5,1", "seed=0,1",
                   "eval.metrics=[moments]", "eval.stability_metric=var_ratio", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    sweep = tmp_path / "runs" / "default-tiny"
    runs = sorted(p.name for p in sweep.iterdir() if (p / "results.jsonl").exists())
    assert len(runs) == 4 and all("policy.lam=" in r and "seed=" in r for r in runs)
    table = (sweep / "figures" / "summary.csv").read_text().splitlines()
    assert len(table) == 1 + 4
    # simulate-report redraws from the run directories alone, grouping seeds into one regime
    code = "from simulator.report_cli import simulate_report; simulate_report()"
    args = [str(sweep), "--out", str(tmp_path / "rep"), "--metric", "var_ratio", "--metric", "mean_drift"]
    rep = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "stability.png").stat().st_size > 0
    header = (tmp_path / "rep" / "summary.csv").read_text().splitlines()[0]
    assert "var_ratio_rho" in header and "mean_drift_rho" in header
    assert len((tmp_path / "rep" / "results.csv").read_text().splitlines()) == 1 + 4 * 3  # runs x generations
    bad = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_end_in_one_line_keeping_whole_generations(tmp_path, sig, code):
    args = ["experiment=single", "data=gaussian", "model=gaussian", "eval=fast", "chains=4",
            "generations=100000", "progress=false", "durable=false"]  # fmt: skip
    cmd = [sys.executable, "-c", "from simulator.cli import simulate; simulate()", *args]
    # the child gets the default dispositions: a signal ignored by the test process (a launcher's pool in an
    # earlier test can leave SIGINT ignored) stays ignored across exec, and Python then installs no Ctrl-C
    reset = functools.partial(signal.signal, sig, signal.SIG_DFL)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=reset)  # fmt: skip
    run = tmp_path / "runs" / "default"
    deadline = time.monotonic() + 120
    try:
        while not list(run.glob("*/gen_002")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # until a few generations are committed
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never left running when an assertion or the timeout fails the test
    assert proc.returncode == code
    assert len(err.strip().splitlines()) == 1 and "run the same command again" in err
    (path,) = run.iterdir()
    done = RunDir(path).repair()  # whatever was committed is whole and checksummed
    assert len(done) >= 3 and all(RunDir(path).verify_all(t) for t in done)


def test_report_skips_broken_runs_with_one_line_each(tmp_path, capsys):
    from simulator.report_cli import simulate_report
    from simulator.rundir import write_atomic

    def run(name: str, config: str, lines: list[str]) -> Path:
        path = tmp_path / "sweep" / name
        path.mkdir(parents=True)
        write_atomic(path / "config.yaml", config)
        write_atomic(path / "results.jsonl", "".join(x + "\n" for x in lines))
        return path

    rows = [json.dumps({"generation": t, "status": "ok", "kl": 1.0 / (t + 1)}) for t in range(3)]
    run("good", "seed: 0\npolicy: {name: replace}\n", rows)
    run("garbage_first_line", "seed: 1\npolicy: {name: replace}\n", ["{not json", *rows])
    run("bad_config", "seed: [unclosed\n", rows)
    simulate_report([str(tmp_path / "sweep"), "--out", str(tmp_path / "rep"), "--metric", "kl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert any("skipping" in x and "bad_config" in x and "config.yaml: unreadable" in x for x in err), err
    assert any("garbage_first_line" in x and "line(s) 1" in x for x in err), err
    # both readable runs are in the tidy table: the garbage first line hid none of the rows after it
    assert len((tmp_path / "rep" / "results.csv").read_text().splitlines()) == 1 + 2 * 3
    with pytest.raises(SystemExit) as stop:  # an output folder that cannot be made: one line, exit 2
        blocked = tmp_path / "sweep" / "good" / "config.yaml" / "x"  # below a file
        simulate_report([str(tmp_path / "sweep"), "--out", str(blocked), "--metric", "kl"])
    assert stop.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3  # the two skips again, then the error
