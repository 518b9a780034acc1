"""Hydra entry point `simulate-contaminate`: config -> real data, generator, cell grid -> run directory.

Thin like simulator.cli: validation here, the work in grid.py. A user's mistake (a ratio outside its
range, a missing loop run directory, an unknown shift) ends in one line on stderr and exit code 2 before
anything is written. Run it as `simulate-contaminate ...` or `python -m simulator.contamination.cli ...`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from simulator import classifiers, registry, seeding, shifts, strict_json
from simulator.cli import CONFIG_DIR, fail
from simulator.config import ConfigError, check_bool, check_choice, check_float, check_int
from simulator.contamination import grid, report
from simulator.contamination.mixing import MODES, ContaminationError, check_ratio
from simulator.contamination.robustness import MIN_POINTS
from simulator.contamination.sources import KINDS, GeneratorSource, loop_generations, pick_generation
from simulator.data.base import Dataset
from simulator.run import RunDir, RunError

CONFIG_NAME = "contaminate"
RENAMED = {"real_shifted": "control"}  # old mode names -> new
USER_ERRORS = (ConfigError, RunError, ContaminationError)
log = logging.getLogger("simulator")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad field of a composed contamination config."""
    check_int(cfg, "seed", 0)
    seeds = _plain(cfg.get("seeds"))
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"seeds: must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    check_choice(cfg, "device", ("auto", "cpu", "cuda"))
    check_bool(cfg, "progress")
    check_int(cfg, "threads", 1, optional=True)
    if cfg.data.source not in sources():
        raise ConfigError(f"data.source: must be one of {', '.join(sources())}; got {cfg.data.source!r}")
    modes = _plain(cfg.modes) or {}
    for mode, ratios in modes.items():
        if mode in RENAMED:
            raise ConfigError(f"modes.{mode}: renamed to modes.{RENAMED[mode]}")
        if mode not in MODES:
            raise ConfigError(f"modes.{mode}: unknown mode; known: {', '.join(MODES)}")
        if not isinstance(ratios, list):
            raise ConfigError(f"modes.{mode}: must be a list of ratios, got {ratios!r}")
        for r in ratios:
            try:
                check_ratio(mode, r)
            except ContaminationError as e:
                raise ConfigError(str(e)) from None
    check_choice(cfg, "classifier.arch", classifiers.ARCHS)
    check_int(cfg, "classifier.steps", 1)
    check_int(cfg, "classifier.batch_size", 1)
    check_float(cfg, "classifier.lr", 0.0, strict=True)
    check_float(cfg, "classifier.weight_decay", 0.0)
    check_choice(cfg, "classifier.optimizer", classifiers.OPTIMIZERS)
    check_choice(cfg, "classifier.augment", classifiers.AUGMENTS)
    check_int(cfg, "classifier.seed", 0, optional=True)
    check_float(cfg, "split.fraction", 0.0, strict=True)
    if cfg.split.fraction > 1:
        raise ConfigError(f"split.fraction: must be in (0, 1], got {cfg.split.fraction}")
    if cfg.split.fraction == 1 and any(r > 0 for r in modes.get("control") or []):
        raise ConfigError(
            "split.fraction: 1.0 leaves no held-out real images for modes.control; use a fraction < 1 "
            "or modes.control=[]"
        )
    if cfg.control.shift is not None:
        check_choice(cfg, "control.shift", list(shifts.SHIFTS))
    check_int(cfg, "control.severity", 1)
    if cfg.control.severity > 5:
        raise ConfigError(f"control.severity: must be an integer in 1..5, got {cfg.control.severity}")
    severity = _plain(cfg.eval.severity)
    levels = severity if isinstance(severity, list) else [severity]
    if (
        not levels
        or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in levels)
        or len(set(levels)) != len(levels)
    ):
        raise ConfigError(
            f"eval.severity: must be an integer in 1..5 or a list of distinct ones, got {severity!r}"
        )
    for name in cfg.eval.shifts:
        if name not in shifts.SHIFTS:
            raise ConfigError(f"eval.shifts: unknown shift {name!r}; known: {', '.join(shifts.SHIFTS)}")
    baselines = _plain(cfg.eval.baselines) or []
    for i, b in enumerate(baselines):
        if not isinstance(b, dict) or b.get("arch", cfg.classifier.arch) not in classifiers.ARCHS:
            raise ConfigError(
                f"eval.baselines[{i}]: must be a mapping with arch in {classifiers.ARCHS}, got {b!r}"
            )
        unknown = set(b) - set(cfg.classifier)
        if unknown:
            raise ConfigError(f"eval.baselines[{i}]: unknown classifier keys {sorted(unknown)}")
    if baselines and len(baselines) * len(seeds) + 1 < MIN_POINTS:
        raise ConfigError(
            f"eval.baselines: effective robustness needs >= {MIN_POINTS} real-only models "
            f"(baselines x seeds + 1); got {len(baselines) * len(seeds) + 1}; or set []"
        )
    _validate_generator(cfg, modes)


def _validate_generator(cfg: DictConfig, modes: dict[str, list]) -> None:
    """The generator block, when some cell needs generated images (a missing run dir is caught here)."""
    needs = any(r > 0 for m, rs in modes.items() if m != "control" for r in rs) or bool(
        modes.get("generations")
    )
    if not needs:
        return
    gen = cfg.generator
    check_choice(cfg, "generator.kind", KINDS)
    check_int(cfg, "generator.seed", 0, optional=True)
    check_choice(cfg, "generator.samples", ("auto", "saved", "model"))
    check_float(cfg, "generator.temperature", 0.0, strict=True)
    if gen.kind == "external":
        path = gen.get("path")
        if not path or not Path(os.path.expanduser(str(path))).exists():
            raise ConfigError(f"generator.path: no such folder or .npz file: {path}")
        if modes.get("generations"):
            raise ConfigError("modes.generations: needs generator.kind=run (a loop run directory)")
        return
    if gen.kind == "train":
        check_choice(cfg, "generator.family", sorted(registry.FAMILIES))
        check_int(cfg, "generator.steps", 1, optional=True)
        check_bool(cfg, "generator.per_class")
        if modes.get("generations"):
            raise ConfigError("modes.generations: needs generator.kind=run (a loop run directory)")
        return
    replicates = _plain(gen.get("replicates"))
    if replicates is not None:
        seeds = _plain(cfg.seeds)
        if not isinstance(replicates, list) or len(replicates) != len(seeds):
            raise ConfigError(
                f"generator.replicates: must list one loop run directory per replicate seed ({len(seeds)}), "
                f"got {replicates!r}"
            )
        pairs = [(d, f"generator.replicates[{i}]") for i, d in enumerate(replicates)]
    else:
        dirs = _plain(gen.run_dirs) or [gen.run_dir]
        if dirs == [None]:
            raise ConfigError("generator.run_dir: a loop run directory is needed with generator.kind=run")
        pairs = [
            (d, "generator.run_dir" if gen.run_dirs is None else f"generator.run_dirs[{i}]")
            for i, d in enumerate(dirs)
        ]
    try:
        for d, field in pairs:
            committed = loop_generations(d, field)
            pick_generation(_plain(gen.generation), committed, "generator.generation")
            for t in _plain(gen.generations) or []:
                pick_generation(t, committed, "generator.generations")
    except ContaminationError as e:
        raise ConfigError(str(e)) from None


def sources() -> list[str]:
    """Data sources the contamination paths can read: the registry's and the coloured ones."""
    from simulator.data.colored import COLORED_SOURCES

    return sorted(set(registry.source_names()) | set(COLORED_SOURCES))


def load_data(cfg: DictConfig) -> Dataset:
    """The real labelled data named by cfg.data (one chain)."""
    from simulator.data.colored import COLORED_SOURCES, make_colored

    node = OmegaConf.create({"data": _plain(cfg.data), "chains": 1, "seed": cfg.seed})
    if cfg.data.source in registry.source_names():
        return registry.make_data(node)
    if cfg.data.source in COLORED_SOURCES:  # until registry.SOURCE_MODULES lists simulator.data.colored
        try:
            source = make_colored(cfg.data.source, **(_plain(cfg.data.options) or {}))
            return source.load(
                chains=1,
                n_train=cfg.data.n_train,
                n_test=cfg.data.n_test,
                generator=seeding.generator(cfg.seed, "data"),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data ({cfg.data.source}): {e}") from None
    raise ConfigError(f"data.source: must be one of {', '.join(sources())}; got {cfg.data.source!r}")


def run_contaminate(cfg: DictConfig, run_path: str | Path) -> dict[str, Any]:
    """Validate cfg, build the real data, generator and grid, and run (or resume) it in run_path."""
    validate(cfg)
    device = registry.resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = _plain(cfg)
    data = load_data(cfg)
    setup = grid.prepare(
        data,
        seed=cfg.seed,
        split_fraction=cfg.split.fraction,
        control_shift=cfg.control.shift,
        control_severity=cfg.control.severity,
        shift_names=list(cfg.eval.shifts),
        severity=_plain(cfg.eval.severity),
    )
    modes = {m: [float(r) for r in rs] for m, rs in (config["modes"] or {}).items() if rs}
    run_path = Path(run_path)
    needs_generator = (
        any(r > 0 for m, rs in modes.items() if m != "control" for r in rs) or "generations" in modes
    )
    source = None
    if needs_generator:
        source = GeneratorSource(
            config["generator"],
            run_path,
            setup.full,
            setup.num_classes,
            tuple(setup.test.images.shape[1:]),
            device=device,
            seeds=list(cfg.seeds),
            attribute_of=setup.attribute_of,
            progress=cfg.progress,
        )
    default_t = source.default_generation() if source else None
    generations = source.generations() if source and "generations" in modes else []
    cells = grid.plan(
        modes,
        list(cfg.seeds),
        config["eval"]["baselines"] or [],
        default_t,
        generations,
        gen_seed=source.gen_seed if source else None,
    )
    with RunDir(run_path) as run:
        run.check_config(config)
        rows = grid.run_grid(
            run,
            setup,
            cells,
            source,
            config["classifier"],
            classifier_seed=cfg.classifier.seed,
            device=device,
            save_models=cfg.eval.save_models,
            progress=cfg.progress,
        )
        summary = report.summarize(run.path, rows)
        if cfg.eval.figures:
            report.draw([run.path], run.path / "figures")
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run_path = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_contaminate(cfg, run_path)
    except USER_ERRORS as e:
        fail(str(e), run_path)
    log.info(
        "%s: %s", run_path, strict_json.dumps({k: summary[k] for k in ("cells", "status") if k in summary})
    )


def preflight(args: list[str]) -> None:
    """Compose and validate every job of the command line before hydra makes anything (as simulator.cli)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            for job in jobs or [[]]:
                validate(compose(CONFIG_NAME, overrides=list(job)))
    except USER_ERRORS as e:
        fail(str(e))
    except Exception as e:  # hydra's composition and parse errors: the first line says what is wrong
        fail(f"command line: {(str(e).strip() or type(e).__name__).splitlines()[0]}")


def simulate_contaminate() -> None:
    """Console entry point of `simulate-contaminate`."""
    from simulator.cli import stoppable

    with stoppable():
        if not any(
            a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c") or a.startswith("--info")
            for a in sys.argv[1:]
        ):
            preflight(sys.argv[1:])
        _main()


class SweepReport(Callback):
    """Hydra callback: after a contamination multirun, draw the figures over all its runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = [p.parent for p in sorted(sweep.glob("*/results.jsonl"))]
        if runs:
            print(f"contamination figures: {report.draw(runs, sweep / 'figures')}")


if __name__ == "__main__":
    simulate_contaminate()
