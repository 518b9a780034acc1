"""What the hydra entry points share: `simulate` (simulator/cli.py) and `simulate-contaminate`
(simulator/contamination/cli.py) differ only in their config, their build (what the preflight checks per
job) and their run (one job); the plumbing around them is here, once.

- console: Ctrl-C and SIGTERM end in one line (stoppable); unless the command line asks for help, every job
  of the sweep is built before hydra makes anything (preflight); then hydra's own main runs the jobs (with
  the submitit launchers of simulator.launchers: every job waited for, one line per failed one).
- job: the boundary of one hydra job: a user's mistake (errors) ends in one line on stderr, exit code 2,
  and the run directory hydra made for this call (empty) is removed with its parents left empty; a full
  disk (rundir.DiskFull) ends in one line and exit code 1, keeping what was written so the run resumes.
- SweepCallback: after a multirun, the report over every run the sweep holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from simulator import keys, options
from simulator.config import ConfigError
from simulator.preflight import check_jobs
from simulator.rundir import DiskFull, RunError

CONFIG_DIR = str(options.CONFIG_DIR)  # hydra's config_path: a string
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, RunError)  # each entry point adds its own
HELP_FLAGS = ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c")  # hydra answers these, runs nothing
log = logging.getLogger("simulator")

keys.register_resolvers()  # both configs' run directory names (and config.yaml's excluded keys)


def fail(message: str, created: Path | None = None, code: int = 2) -> None:
    """Print one line, remove the empty run directory hydra made for this call, exit with code (2: the
    user's mistake; 1: the machine's, e.g. a full disk)."""
    if created is not None and created.is_dir() and not any(created.iterdir()):
        created.rmdir()
    print(f"error: {'; '.join(line.strip() for line in message.strip().splitlines())}", file=sys.stderr)
    sys.exit(code)


def discard(run_path: Path, root: Path) -> None:
    """Remove run_path (made by hydra for this call, found empty) and its parents that are left empty, up
    to run_root: a refused job leaves no new directory behind."""
    shutil.rmtree(run_path, ignore_errors=True)
    root = root.resolve()
    for parent in run_path.resolve().parents:
        if not parent.is_relative_to(root) or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a SLURM preemption, `kill`): ends the run like Ctrl-C, with its own exit code."""


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the command with one line on stderr (exit 130 / 143), not a traceback.

    Nothing is lost that a rerun needs: committed generations (and cells), sample shards and fit
    checkpoints are written atomically, so the same command resumes from them.
    """

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt as e:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"{what}: what was committed is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def asks_help(args: list[str]) -> bool:
    """Whether hydra will only print something (help, info, the config) for this command line."""
    return any(a in HELP_FLAGS or a.startswith("--info") for a in args)


def preflight(
    args: list[str], config_name: str, build: Callable[[DictConfig, dict], Any],
    errors: tuple[type[Exception], ...], check_args: Callable[[list[str]], None] | None = None,
    hint: Callable[[list[str], str], str] | None = None,
) -> None:  # fmt: skip
    """Compose, validate and build every job of the sweep before hydra makes anything (check_args, when
    given, looks at the command line first: what only the entry point can explain better than hydra;
    hint(args, message), when given, returns what to add to an error's line: "" for nothing).

    The sweep is the command line's and the experiment config's (hydra.sweeper.params). Hydra reports its
    own errors (bad override syntax, unknown keys or groups) on several lines with exit code 1, and only
    after it has made output directories; checking here first gives every mistake -- of any job of a
    sweep -- one line and exit code 2, with nothing written.
    """
    try:
        if check_args is not None:
            check_args(args)
        check_jobs(args, config_name, build)
    except errors as e:
        fail(str(e) + (hint(args, str(e)) if hint else ""))


def console(
    hydra_main: Callable[[], Any], config_name: str, build: Callable[[DictConfig, dict], Any],
    errors: tuple[type[Exception], ...], check_args: Callable[[list[str]], None] | None = None,
    hint: Callable[[list[str], str], str] | None = None,
) -> None:  # fmt: skip
    """A console script: the preflight of sys.argv, then hydra's main (which reads sys.argv), stoppable."""
    with stoppable():
        if not asks_help(sys.argv[1:]):
            preflight(sys.argv[1:], config_name, build, errors, check_args, hint)
        wait_for_every_job()
        hydra_main()


def wait_for_every_job() -> None:
    """With hydra's submitit plugin installed, its launchers become simulator.launchers': a sweep ends once
    every job has, and a failed job is one line (its run directory and its error), exit code 1."""
    try:
        from simulator import launchers
    except ImportError:  # no sweep extra: the preflight has refused launcher=slurm in one line already
        return
    launchers.install()


def job(
    cfg: DictConfig, run: Callable[[DictConfig, Path], Any], errors: tuple[type[Exception], ...]
) -> tuple[Path, Any]:
    """One hydra job: run(cfg, run_path) in the directory hydra made for it; returns (run_path, its result).

    A user error ends in one line (exit 2), and the directory is removed, with its parents left empty up
    to run_root, when hydra made it for this call (it was empty): a refused job leaves nothing behind.
    """
    run_path = Path(HydraConfig.get().runtime.output_dir)
    made_now = run_path.is_dir() and not any(run_path.iterdir())
    try:
        return run_path, run(cfg, run_path)
    except DiskFull as e:  # the machine's: what was written stays (the rerun resumes from it), exit 1
        fail(str(e), code=1)
        raise  # not reached: fail exits
    except errors as e:
        if made_now:
            discard(run_path, Path(os.path.expanduser(str(cfg.run_root))))
        fail(str(e))
        raise  # not reached: fail exits


class SweepCallback(Callback):
    """Hydra callback: after a multirun, report(config, sweep_dir, runs) over the run directories it holds
    (each with a results.jsonl); prints what report returns. Subclasses say what the report is."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = [p.parent for p in sorted(sweep.glob("*/results.jsonl"))]
        if runs:
            print(self.report(config, sweep, runs))

    def report(self, config: DictConfig, sweep: Path, runs: list[Path]) -> str:
        raise NotImplementedError
