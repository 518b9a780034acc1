"""Hydra entry points: `simulate` (config -> objects -> loop) and `simulate-report`.

Thin by design: registry.py turns the config into objects, loop.py does the work.
A user's mistake ends in one line on stderr and exit code 2, before any work
starts and without touching an existing run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from simulator import checks, entry, keys, mitigations, registry, stability, step_log, strict_json
from simulator.entry import CONFIG_DIR
from simulator.loop import (
    CommitOptions,
    EvalOptions,
    SampleOptions,
    TrainOptions,
    from_config,
    generation_loop,
)
from simulator.models.base import world
from simulator.policies import PolicyError
from simulator.preflight import (
    cached,
    check_checkpoint,
    check_files,
    check_run_root,
    check_sizes,
    check_weights,
    plain,
)
from simulator.rundir import RunDir, write_atomic

USER_ERRORS = (*entry.USER_ERRORS, PolicyError)
log = logging.getLogger("simulator")


def build(cfg: DictConfig, cache: dict | None = None) -> tuple[str, Any, Any, Any, Any]:
    """Check cfg and build what its run needs: (device, policy, data, model factory, curation reward).

    The preflight calls this for every job of a sweep (with a cache, so a distinct data source or model
    is built once); run_config calls it again for its own job. The config's own mistakes come first (the
    one walk of its checks, simulator.checks), then what only the machine can answer (simulator.preflight):
    the files it names, the device, the data source opened and the config against it, the memory the loop
    needs, the metrics' weights, the model constructed with init.checkpoint loaded into it, run_root.
    """
    _validate(cfg)
    device = registry.resolve_device(cfg.device)
    policy = registry.make_policy(cfg)
    data_key = ("data", plain(cfg.data), cfg.chains)  # the seed draws other rows, of the same sizes
    data = cached(cache, data_key, lambda: registry.make_data(cfg))
    checks.check_data(cfg, data, policy)  # the config against the data: labels, sizes, the metrics' needs
    check_sizes(cfg, data, policy)  # the machine's memory for the loop's tensors
    check_weights(cfg)  # what the machine lacks (FID weights), after the config's mistakes
    model_key = ("model", plain(cfg.model), plain(cfg.init), cfg.chains, tuple(data.event_shape), device)
    make_model = cached(cache, model_key, lambda: registry.make_model_factory(cfg, data.event_shape, device))
    cached(cache, ("checkpoint", *model_key), lambda: check_checkpoint(cfg, make_model))
    reward = None
    if cache is None or cfg.sample.curation_reward != "classifier":  # a classifier reward may train one
        reward = registry.make_curation_reward(cfg, data, device)
    check_run_root(cfg)
    return device, policy, data, make_model, reward


def run_config(cfg: DictConfig, run_path: str | Path) -> dict[str, Any]:
    """Validate cfg, build the objects and run (or resume) the loop in run_path; returns the summary."""
    device, policy, data, make_model, reward = build(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_path = distributed_run_path(Path(run_path), device)
    config = OmegaConf.to_container(cfg, resolve=True)
    gen0_cache = shared_gen0_path(run_path, config) if cfg.get("share_gen0") else None  # type: ignore[arg-type]
    with RunDir(run_path, durable=cfg.durable, writer=world()[0] == 0) as run:
        run.check_config(config)  # type: ignore[arg-type]
        logger = step_log.for_generations(cfg.logger.name, run.path / "tensorboard", cfg.logger.every)
        statistics = OmegaConf.select(cfg, "model.path", default=None) == "statistics"  # no samples drawn
        rows = generation_loop(
            run, data, make_model, policy, generations=cfg.generations, seed=cfg.seed, progress=cfg.progress,
            train=from_config(TrainOptions, cfg.train, init_checkpoint=cfg.init.checkpoint, logger=logger,
                              init_pretrained=cfg.init.get("pretrained"), statistics=statistics,
                              after_fit=mitigations.after_fit(plain(cfg.get("mitigation")))),
            sample=from_config(SampleOptions, cfg.sample, curation_reward=reward),
            evaluate=from_config(EvalOptions, cfg.eval),
            commit=CommitOptions(save_samples=cfg.sample.save, shard_size=cfg.sample.get("shard_size"),
                                 gen0_cache=gen0_cache),
        )  # fmt: skip
        summary = stability.summarize(rows, cfg.eval.stability_metric) if cfg.eval.stability_metric else {}
        last = rows[-1]
        if last["generation"] > cfg.generations and world()[0] == 0:
            print(f"warning: {run.path} already holds generations 0..{last['generation']}; generations="
                  f"{cfg.generations} removes none (the run keeps them)", file=sys.stderr)  # fmt: skip
        status = "diverged" if last["status"] == "diverged" else "complete"
        summary.update(policy=policy.describe(), generations=last["generation"], status=status)
        if world()[0] == 0:
            text = strict_json.dumps(strict_json.strict_row(summary), indent=1)
            write_atomic(run.path / "summary.json", text, cfg.durable)  # a rename: never through a link
        if cfg.eval.figures and world()[0] == 0:
            from simulator import report

            report.draw_run(run.path)
    return summary


def distributed_run_path(run_path: Path, device: str) -> Path:
    """Under torchrun, or a SLURM or submitit job of several tasks, join the process group (nccl on any CUDA
    device, gloo on the CPU; simulator.distributed.join); every rank then uses run_path (returned unchanged).

    Rank 0 alone writes the run directory (it holds the lock); the other ranks read what it committed
    after a barrier, so the directory must be on a file system every rank sees (a node's disk under
    one torchrun; a shared file system across nodes).
    """
    from simulator import distributed

    distributed.join(device)  # device: build()'s, already this process's own GPU (registry.resolve_device)
    return run_path


def shared_gen0_path(run_path: Path, config: dict[str, Any]) -> Path:
    """<run_root>/<name>/_gen0/<hash>: generation 0's home for every run of config's sweep that differs
    only in keys that cannot change generation 0 (the policy, and keys that never change results)."""
    science = keys.drop(config, (*keys.NON_SCIENCE, "policy", "name"))
    digest = hashlib.sha256(json.dumps(science, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return run_path.parent / "_gen0" / digest


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _simulate(cfg: DictConfig) -> None:
    run_path, summary = entry.job(cfg, run_config, USER_ERRORS)
    log.info("%s: %s", run_path, strict_json.dumps(summary))


def _validate(cfg: DictConfig) -> None:
    """The checks before anything is built: the config alone, then the files and packages it names."""
    checks.check(cfg)  # the schema and each part's own options and rules (one walk)
    check_files(cfg)  # init.checkpoint, init.pretrained, the logger's package


def preflight(args: list[str]) -> None:
    """Compose, validate and build every job of the sweep before hydra creates anything (entry.preflight)."""
    entry.preflight(args, "config", build, USER_ERRORS)


def default_experiment_hint(args: list[str], message: str) -> str:
    """What to add to an unknown model or data option when the command line changes the model or the data
    but keeps the default experiment, whose options are its spline flow's and two moons'."""
    groups = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    if "experiment" in groups or not groups & {"model", "data"} or "unknown option" not in message:
        return ""
    if not message.startswith(("model.options.", "data.options.")):
        return ""
    return " (the default experiment=regimes_2d sets them for its spline flow; add experiment=single)"


def simulate() -> None:
    """Console entry point of `simulate`."""
    entry.console(_simulate, "config", build, USER_ERRORS, hint=default_experiment_hint)


class SweepReport(entry.SweepCallback):
    """Hydra callback: after a multirun, draw the regime comparison and summary table in the sweep dir."""

    def report(self, config: DictConfig, sweep: Path, runs: list[Path]) -> str:
        from simulator import report

        metrics = [config.eval.stability_metric, *(config.eval.get("report_metrics") or [])]  # null: none
        out = report.report(runs, sweep / "figures", metric=[m for m in metrics if m])
        return f"comparison figure and table: {out}"
