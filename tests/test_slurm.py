"""The SLURM path: SLURM's task variables mapped to the process group, the launcher configs, and (slow) the
submitit launcher run end to end through its local executor: a sweep's jobs commit, a job killed mid-
generation as SLURM preempts it resumes to the uninterrupted run, a job of two tasks is one process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from simulator import distributed
from tests.test_distributed_utils import fake_gpus, fake_group, launcher_env  # noqa: F401 (fixtures)

# task 5 of a job step of 8 tasks on two nodes of 4 GPUs, as srun starts it
SLURM_TASK_5 = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]",
                "SLURM_STEP_NODELIST": "gpu[007-008]"}  # fmt: skip


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu[007-008]", "gpu007"), ("gpu[012,003-004],cpu1", "gpu012"), ("node7", "node7"),
     ("a,b[1-2]", "a"), ("rack[1-2]-n[07-09]", "rack1-n07"), ("x[5]", "x5")],
)  # fmt: skip
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_slurm_task_variables_give_its_rank(monkeypatch):
    launcher_env(monkeypatch, **SLURM_TASK_5)
    where = distributed.place()
    assert (where.rank, where.world_size, where.local_rank, where.launcher) == (5, 8, 1, "slurm")
    assert where.master_addr == "gpu007" and 20000 <= where.master_port < 60000
    launcher_env(monkeypatch, **{**SLURM_TASK_5, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert distributed.place().master_port == where.master_port  # every task finds the same rendezvous
    launcher_env(monkeypatch, **{**SLURM_TASK_5, "SLURM_JOB_ID": "4243"})
    assert distributed.place().master_port != where.master_port  # another job on the node: another port
    launcher_env(monkeypatch, **SLURM_TASK_5, MASTER_PORT="29555")
    assert distributed.place().master_port == 29555


def test_a_batch_script_without_srun_is_one_process(monkeypatch):
    """sbatch --ntasks=4 runs its script once, with SLURM_NTASKS=4: a process started there directly is
    alone (it would wait forever for three tasks that do not exist)."""
    launcher_env(monkeypatch, SLURM_JOB_ID="9", SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_LOCALID="0",
                 SLURM_JOB_NODELIST="n[1-4]")  # fmt: skip
    assert distributed.place() == distributed.Place()
    launcher_env(monkeypatch, **{**SLURM_TASK_5, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"})
    assert distributed.place() == distributed.Place()  # a step of one task


def test_torchrun_inside_a_slurm_job_wins(monkeypatch):
    launcher_env(monkeypatch, **SLURM_TASK_5, RANK="2", WORLD_SIZE="4", LOCAL_RANK="2")
    assert distributed.place() == distributed.Place(2, 4, 2, launcher="torchrun")


def test_a_slurm_task_joins_the_group_on_its_own_gpu(monkeypatch, fake_gpus, fake_group):  # noqa: F811
    """What run_config does in task 5: device auto -> its own GPU (local rank 1), made current before any
    build; then nccl, with torchrun's variables set from SLURM's for env:// (and anything reading them)."""
    from simulator import registry
    from simulator.cli import distributed_run_path

    launcher_env(monkeypatch, **SLURM_TASK_5)
    device, port = registry.resolve_device("auto"), str(distributed.place().master_port)
    assert device == "cuda:1" and fake_gpus == [("set_device", "cuda:1")]
    distributed_run_path(Path("run"), device)
    exported = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007"}
    assert fake_group == [("nccl", {**exported, "MASTER_PORT": port})]


def test_submitit_local_tasks_give_their_rank(monkeypatch):
    pytest.importorskip("submitit")
    job = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "777", "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}  # fmt: skip
    launcher_env(monkeypatch, **job, SUBMITIT_LOCAL_NTASKS="2", SUBMITIT_LOCAL_GLOBALID="1",
                 SUBMITIT_LOCAL_LOCALID="1")  # fmt: skip
    where = distributed.place()
    assert (where.rank, where.world_size, where.local_rank, where.master_addr) == (1, 2, 1, "127.0.0.1")
    launcher_env(monkeypatch, **job, SUBMITIT_LOCAL_NTASKS="1", SUBMITIT_LOCAL_GLOBALID="0",
                 SUBMITIT_LOCAL_LOCALID="0")  # fmt: skip
    assert distributed.place() == distributed.Place()


def _launcher(*overrides: str):
    from hydra import compose, initialize_config_dir

    from simulator.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=single", *overrides], return_hydra_config=True)


def test_launcher_configs_ask_for_the_devices_they_run_on():
    """launcher=slurm: CPU jobs of one task (device=cpu); launcher=slurm_gpu: one task per GPU, so setting
    gpus_per_node sets both, and device=auto (the login node that submits may have no GPU)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cpu = _launcher("launcher=slurm")
    assert (cpu.device, cpu.hydra.launcher.gpus_per_node, cpu.hydra.launcher.tasks_per_node) == ("cpu", 0, 1)
    gpu = _launcher("launcher=slurm_gpu", "hydra.launcher.gpus_per_node=8")
    assert (gpu.device, gpu.hydra.launcher.gpus_per_node, gpu.hydra.launcher.tasks_per_node) == ("auto", 8, 8)
    local = _launcher("launcher=submitit_local")
    assert local.hydra.launcher._target_.endswith("LocalLauncher")


JOB_TRACEBACK = """submitit INFO (2025-01-01 00:00:00,000) - Starting with JobEnvironment(job_id=7)
Traceback (most recent call last):
  File "simulator/loop.py", line 300, in generation_loop
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB
submitit INFO (2025-01-01 00:00:01,000) - Job completed
"""


@pytest.mark.parametrize(
    "log, line",
    [
        ("submitit INFO (..) - Starting\nerror: run directory r holds a symbolic link l -> /x\n",
         "run directory r holds a symbolic link l -> /x"),  # simulate's own one line wins
        (JOB_TRACEBACK, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("submitit WARNING (..) - Bypassing signal SIGTERM\n", None),  # killed: nothing says why
        ("", None),
        (None, None),
    ],
)  # fmt: skip
def test_the_error_line_of_a_jobs_log(log, line):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from simulator import launchers

    assert launchers.error_line(log) == line


def test_a_killed_job_says_so_with_its_state_and_log():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from types import SimpleNamespace

    from submitit.core.utils import FailedJobError, UncompletedJobError

    from simulator import launchers

    class Job:  # what `why` reads of a submitit job
        state, paths = "OUT_OF_MEMORY", SimpleNamespace(stderr=Path("sweep/.submitit/7/7_0_log.err"))

        def __init__(self, log):
            self.log = log

        def stderr(self):
            return self.log

    killed = launchers.why(Job("submitit WARNING - Bypassing signal SIGTERM"), UncompletedJobError("none"))
    assert killed == ("ended without a result and without an error line (killed? submitit's state: "
                      "OUT_OF_MEMORY); its log: sweep/.submitit/7/7_0_log.err")  # fmt: skip
    quoted = FailedJobError(f"Job (task=0) failed during processing with trace:\n----\n{JOB_TRACEBACK}----")
    assert launchers.why(Job(None), quoted) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_simulate_launches_with_the_launchers_that_wait_for_every_job(monkeypatch):
    """The configs keep the plugin's _target_; simulate's console maps it to simulator.launchers' classes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.core.plugins import Plugins

    from simulator import entry, launchers

    registry = Plugins.instance().class_name_to_class
    for config in ("submitit_local", "slurm", "slurm_gpu"):
        target = _launcher(f"launcher={config}").hydra.launcher._target_
        monkeypatch.setitem(registry, target, registry[target])  # restored after the test
    entry.wait_for_every_job()
    assert registry[_launcher("launcher=submitit_local").hydra.launcher._target_] is launchers.LocalLauncher
    assert registry[_launcher("launcher=slurm").hydra.launcher._target_] is launchers.SlurmLauncher
    assert registry[_launcher("launcher=slurm_gpu").hydra.launcher._target_] is launchers.SlurmLauncher


# --- two real processes started with SLURM's variables only ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_task(rank: int, port: int, out: str) -> None:
    """A task as srun starts it: SLURM's variables only (this spawned process's own environment)."""
    for name in [n for n in os.environ if n in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or n[:6] == "SLURM_"]:
        del os.environ[name]
    os.environ.update(SLURM_JOB_ID="1", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(rank),
                      SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost",
                      MASTER_PORT=str(port))  # fmt: skip
    distributed.join("cpu")
    try:
        total = distributed.all_sum(torch.tensor([float(rank + 1)]))
        if rank == 1:
            torch.save({"world": distributed.world(), "total": total}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: 10-20 s on 2 shared cores
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_slurm_tasks_form_one_process_group(tmp_path):
    out = str(tmp_path / "rank1.pt")
    mp.spawn(_slurm_task, args=(_free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["world"] == (1, 2) and float(got["total"]) == 3.0


# --- the submitit launcher end to end (its local executor: the jobs SLURM would run, on this machine) ------

GLOW = ["data=digits", "model=glow", "model.options.blocks_per_level=1", "model.options.hidden=8",
        "model.options.batch_size=16", "data.n_train=40", "data.n_test=16", "train.steps=40",
        "train.steps_gen0=4", "train.checkpoint_every=1", "generations=2", "eval=digits",
        "eval.metrics=[bpd]", "eval.n_samples=48", "eval.figures=false", "sample.shard_size=16",
        "eval.stability_metric=bpd", "durable=false", "threads=1"]  # fmt: skip
POLICIES = "policy=accumulate,replace"
STARTED: list[subprocess.Popen] = []  # every sweep a test started, ended with its jobs when it is done


@pytest.fixture(autouse=True)
def end_sweeps():
    """A test that fails while its sweep runs leaves no sweep, job or task running behind it."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sweep(root: Path, *args: str) -> subprocess.Popen:
    """`simulate -m ... launcher=submitit_local` writing under root (its own process; output in a file)."""
    code = "from simulator.cli import simulate; simulate()"
    argv = [sys.executable, "-c", code, "-m", "experiment=single", "progress=false",
            "launcher=submitit_local", f"run_root={root}", "name=s", *GLOW, *args]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.log", "a") as log:  # the child writes it through its own copy
        # its own process group: the jobs' controllers and tasks are in it, for finish to end them all
        proc = subprocess.Popen(argv, cwd=root.parent, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    """The sweep's exit code (past timeout, the test fails, and end_sweeps ends the sweep)."""
    return proc.wait(timeout)


def runs(root: Path) -> dict[str, Path]:
    """The sweep's run directories by policy (the name in each one's config.yaml)."""
    found = (root / "s").glob("*/config.yaml")
    return {yaml.safe_load(p.read_text())["policy"]["name"]: p.parent for p in found}


def content(run: Path) -> dict:
    """What a run computed: its generations' tensors files (samples, models, optimizer) and its rows."""
    from simulator.rundir import RunDir
    from tests.test_faults import files, strip

    return {"files": files(run), "rows": strip(RunDir(run).rows())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root = tmp_path_factory.mktemp("reference") / "runs"
    assert finish(sweep(root, POLICIES)) == 0, (root.parent / "runs.log").read_text()[-3000:]
    return {policy: content(run) for policy, run in runs(root).items()}


def wait_for(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The first file of the sweep under root matching pattern (a glob in a run directory) once it exists,
    while the sweep still runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted((root / "s").glob(f"*/{pattern}"))
        if found:
            return found[0]
        assert proc.poll() is None, "the sweep ended before the moment the test waits for"
        time.sleep(0.005)
    raise AssertionError(f"no {root}/s/*/{pattern} within {timeout} s")


def writer_pid(run: Path) -> int:
    """The pid of the task writing run (its .lock holds it once taken)."""
    for _ in range(1000):
        text = (run / ".lock").read_text().strip()
        if text:
            return int(text)
        time.sleep(0.005)
    raise AssertionError(f"{run}/.lock holds no pid")


def running(pid: int) -> bool:
    """Whether process pid runs (exists and is not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Durations measured on the 2-core development machine while other test suites ran (load ~11); each
# command starts interpreters that import torch: the sweep's own, and one per job.
@pytest.mark.slow  # 2.5 min: two jobs
def test_sweep_jobs_run_and_commit(reference):
    assert sorted(reference) == ["accumulate", "replace"]
    for policy, run in reference.items():
        assert [r["generation"] for r in run["rows"]] == [0, 1, 2], policy
        assert {"gen_002/model.safetensors", "gen_002/samples_00000.pt"} <= set(run["files"])


@pytest.mark.slow  # 3.5 min: the sweep killed, then submitted again
def test_job_preempted_mid_generation_is_resubmitted_and_ends_identical(tmp_path, reference):
    """SLURM preempts with SIGTERM, then SIGKILL after its grace time; submitit ignores the SIGTERM (it logs
    it). The first job to reach generation 1's fit is killed inside it (a fit checkpoint in gen_001.tmp)
    while the other job finishes; submitting the same sweep again skips the finished run and resumes the
    killed one from its checkpoint: both equal the uninterrupted sweep's runs, bit for bit."""
    root = tmp_path / "runs"
    proc = sweep(root, POLICIES)
    run = wait_for(root, "gen_001.tmp/fit_state.pt", proc).parent.parent
    pid = writer_pid(run)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert running(pid)  # submitit bypasses SIGTERM (it waits for SIGUSR2, or the SIGKILL)
    os.kill(pid, signal.SIGKILL)
    assert finish(proc) == 1  # the sweep reports the job that ended without a result, in one line:
    (line,) = failure_lines(tmp_path / "runs.log")
    assert line.startswith("error: job #") and f"({run}) failed: ended without a result" in line
    assert "submitit's state: FINISHED" in line and "_log.err" in line
    (other,) = [r for r in runs(root).values() if r != run]
    assert (other / "summary.json").exists()  # the command waited for the other job to end
    assert not (run / "gen_001").exists() and (run / "gen_001.tmp").is_dir()
    finished = (other / "results.jsonl").stat().st_mtime_ns
    assert finish(sweep(root, POLICIES)) == 0, (tmp_path / "runs.log").read_text()[-3000:]
    assert (other / "results.jsonl").stat().st_mtime_ns == finished  # the finished run is not redone
    got = {policy: content(r) for policy, r in runs(root).items()}
    assert got == reference


def failure_lines(log: Path) -> list[str]:
    """The lines a sweep command ended with for its failed jobs; the log holds no traceback of its own."""
    text = log.read_text()
    assert "Traceback" not in text and "HYDRA_FULL_ERROR" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("error:")]


def run_dir(root: Path, *overrides: str) -> Path:
    """The run directory sweep(root, ...) gives the job of these overrides (hydra.sweep.dir/subdir)."""
    from hydra.core.hydra_config import HydraConfig

    full = _launcher("progress=false", "launcher=submitit_local", f"run_root={root}", "name=s", *GLOW,
                     *overrides)  # fmt: skip
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        hydra_config.set_config(full)  # ${hydra:job.override_dirname} resolves against this job
        return Path(str(full.hydra.sweep.dir)) / str(full.hydra.sweep.subdir)
    finally:
        hydra_config.cfg = before


@pytest.mark.slow  # 1.5 min: one job fails at once, the other runs
def test_a_failed_job_is_one_line_naming_its_run_and_its_error(tmp_path):
    """A job that fails in its run (here: a link planted in its run directory, refused when the run opens)
    ends the sweep, once every job has ended, with one line: the job's run directory and its own error
    line; exit code 1, no traceback. The sweep's other job is finished when the command returns."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root = tmp_path / "runs"
    broken = run_dir(root, "policy=replace")
    broken.mkdir(parents=True)
    os.symlink("/nowhere", broken / "planted")
    assert finish(sweep(root, POLICIES)) == 1
    (line,) = failure_lines(tmp_path / "runs.log")
    assert line.startswith(f"error: job #1 ({broken}) failed: run directory {broken} holds a symbolic")
    assert line.endswith("symbolic link planted -> /nowhere; the run writes only files of its own there: "
                         "remove the link (or put a copy of what it points to in its place)")  # fmt: skip
    done = runs(root)["accumulate"]
    assert (done / "summary.json").exists() and not (broken / "config.yaml").exists()


@pytest.mark.slow  # 2 min
def test_preemption_signal_requeues_the_job_in_place(tmp_path, reference):
    """submitit's preemption/timeout signal (SIGUSR2) checkpoints the job and requeues it: the job restarts
    by itself, resumes from generation 2's fit checkpoint, and the one sweep command ends as usual."""
    root = tmp_path / "runs"
    proc = sweep(root, "policy=accumulate")
    run = wait_for(root, "gen_002.tmp/fit_state.pt", proc).parent.parent
    os.kill(writer_pid(run), signal.SIGUSR2)
    assert finish(proc) == 0, (tmp_path / "runs.log").read_text()[-3000:]
    logs = "".join(p.read_text() for p in (root / "s" / ".submitit").glob("*/*_log.*"))
    assert "Requeued job" in logs
    assert content(runs(root)["accumulate"]) == reference["accumulate"]


@pytest.mark.slow  # 2.5 min: two sweeps of one job, the second of two tasks
def test_a_job_of_two_tasks_is_one_process_group(tmp_path):
    """tasks_per_node=2: both tasks of the job join one gloo group (simulator.distributed.place reads the
    submitit task's rank) and write one run, rank 0 alone; it equals the one-task job's bit for bit with
    the weights held still (lr 0; with training on, DDP's averaged gradients differ by float rounding)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    one, two = tmp_path / "one", tmp_path / "two"
    assert finish(sweep(one, "policy=accumulate", "model.options.lr=0")) == 0
    tasks = "hydra.launcher.tasks_per_node=2"
    assert finish(sweep(two, "policy=accumulate", "model.options.lr=0", tasks)) == 0
    logs = "".join(p.read_text() for p in (two / "s" / ".submitit").glob("*/*_log.*"))
    assert "global_rank=1(2)" in logs  # submitit started two tasks, and both joined one group:
    assert "rank 0 of 2 (submitit" in logs and "rank 1 of 2 (submitit" in logs and "error:" not in logs
    assert content(runs(two)["accumulate"]) == content(runs(one)["accumulate"])
