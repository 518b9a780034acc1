"""hydra's submitit launchers (launcher=slurm, slurm_gpu, submitit_local), ending a sweep as simulate does.

The plugin's own launcher returns at the first job that failed: hydra then prints a 30-line traceback of
submitit's error (exit code 1), while the sweep's other jobs keep running after the command has ended.
These subclasses wait for every job of the sweep first, then end the command with one line per failed job
-- its run directory and the job's own error line (its `error: ...` line, or the exception line of its
traceback) -- and exit code 1. A job that was killed (SIGKILL, out of memory) leaves no error line: its
line says so, with submitit's state of it and the log to read.

Hydra instantiates only launchers of its plugin namespace (hydra_plugins.*), so `install` maps the
plugin's class names to these classes in hydra's plugin registry for this process; simulate's console
entry (simulator.entry.console) calls it before hydra's main. The jobs themselves are the plugin's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

TRACEBACK = "Traceback (most recent call last):"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")


class JobsFailed(SystemExit):
    """Jobs of a sweep that ended without a result: the message is one line per job. A SystemExit, so that
    hydra's handler, which catches every Exception to print it with a hint about HYDRA_FULL_ERROR, lets it
    through; Python prints the message on stderr and exits with code 1."""


def error_line(log: str | None) -> str | None:
    """The line a job's log gives for its failure: its last `error: ...` line (simulate's one-line errors,
    simulator.entry.fail), else the exception line that ends its last Python traceback; None: neither."""
    lines = [line.rstrip() for line in (log or "").splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: ") :]
    starts = [i for i, line in enumerate(lines) if line == TRACEBACK]
    if starts:  # the exception line is the first one after the indented frames of the traceback
        for line in lines[starts[-1] + 1 :]:
            if line and not line[0].isspace() and EXCEPTION_LINE.match(line):
                return line
    return None


def one_line(text: str) -> str:
    """text on one line (a multi-line exception message joined with '; ')."""
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def why(job: Any, error: BaseException | None) -> str:
    """The job's own error line: from its log (stderr of every task), else from submitit's error (which
    quotes the job's traceback), else what submitit knows: the state, and where the log is."""
    try:
        log = job.stderr()
    except OSError:
        log = None
    found = error_line(log) or (error_line(str(error)) if error is not None else None)
    if found:
        return found
    try:
        state, path = job.state, job.paths.stderr
    except Exception:  # noqa: BLE001 - an executor that cannot say: the line still names the job
        state, path = "unknown", "its submitit folder"
    return (f"ended without a result and without an error line (killed? submitit's state: {state}); "
            f"its log: {path}")  # fmt: skip


class WaitForEveryJob:
    """The launch of the plugin's launchers (BaseSubmititLauncher), waiting for every job of the batch and
    raising JobsFailed for those that ended without a result (mixed in before the plugin's class)."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any
    hydra_context: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Submit one job per override list, wait for all of them, return their JobReturns in order."""
        import submitit

        executor = self._executor(submitit)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:  # as the plugin: the sweep folder's permissions
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for number, overrides in zip(numbers, job_overrides, strict=True):
            plugin.log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(numbers),
                                  list(numbers), [f"job_id_for_{n}" for n in numbers],
                                  [state] * len(numbers))  # fmt: skip
        returns, failed = [], []
        for number, overrides, job in zip(numbers, job_overrides, jobs, strict=True):
            try:
                result = job.results()[0]  # waits for the job
            except submitit.core.utils.UncompletedJobError as e:  # (FailedJobError too): killed, or exited
                failed.append(self._failure(number, overrides, why(job, e)))
                continue
            if result.status == JobStatus.FAILED:  # the task raised: run_job kept the exception
                error = result._return_value  # (its return_value property would print and raise it)
                failed.append(self._failure(number, overrides, f"{type(error).__name__}: {one_line(error)}"))
            returns.append(result)
        if failed:
            raise JobsFailed("\n".join(failed))
        return returns

    def _executor(self, submitit: Any) -> Any:
        """submitit's executor with the launcher's parameters, named as the plugin names them: the shared
        queue parameters as they are, the executor's own ones prefixed with its name (slurm_partition)."""
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        named = {k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        executor.update_parameters(**named)
        return executor

    def _failure(self, number: int, overrides: Sequence[str], reason: str) -> str:
        """One line: the job's run directory and why it failed."""
        return f"error: job #{number} ({self._run_dir(overrides)}) failed: {reason}"

    def _run_dir(self, overrides: Sequence[str]) -> str:
        """The job's run directory (hydra.sweep.dir / hydra.sweep.subdir), resolved as hydra resolves it in
        the job: against the job's own hydra config (its override_dirname), set for the moment."""
        hydra_config = HydraConfig.instance()
        before = hydra_config.cfg
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            hydra_config.set_config(cfg)
            return str(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
        except Exception:  # noqa: BLE001 - the line names the job's overrides instead
            return f"overrides {' '.join(filter_overrides(overrides)) or '(none)'}"
        finally:
            hydra_config.cfg = before


class LocalLauncher(WaitForEveryJob, plugin.LocalLauncher):
    """launcher=submitit_local: submitit's local executor (the jobs SLURM would run, on this machine)."""


class SlurmLauncher(WaitForEveryJob, plugin.SlurmLauncher):
    """launcher=slurm and slurm_gpu: one SLURM job per run."""


def install() -> None:
    """Have hydra instantiate these classes where a config names the plugin's (configs/launcher/*.yaml keep
    the plugin's _target_ and its schema), for this process."""
    registry = Plugins.instance().class_name_to_class
    for ours, theirs in ((LocalLauncher, plugin.LocalLauncher), (SlurmLauncher, plugin.SlurmLauncher)):
        registry[f"{theirs.__module__}.{theirs.__qualname__}"] = ours
