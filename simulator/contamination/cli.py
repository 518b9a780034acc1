"""Hydra entry point `simulate-contaminate`: config -> real data, generator, cell grid -> run directory.

Thin like simulator.cli: validation here, the work in grid.py. A user's mistake (a ratio outside its
range, a missing loop run directory, an unknown shift) ends in one line on stderr and exit code 2 before
anything is written. Run it as `simulate-contaminate ...` or `python -m simulator.contamination.cli ...`.
"""

from __future__ import annotations

import logging
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
from simulator.contamination.sources import GeneratorSource, loop_generations, pick_generation
from simulator.data.base import Dataset
from simulator.run import RunDir, RunError

CONFIG_NAME = "contaminate"
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
    check_float(cfg, "split.fraction", 0.0, strict=True)
    if cfg.split.fraction > 1:
        raise ConfigError(f"split.fraction: must be in (0, 1], got {cfg.split.fraction}")
    if cfg.control.shift is not None:
        check_choice(cfg, "control.shift", list(shifts.SHIFTS))
    check_int(cfg, "control.severity", 1)
    check_int(cfg, "eval.severity", 1)
    if cfg.eval.severity > 5 or cfg.control.severity > 5:
        raise ConfigError("eval.severity and control.severity: must be in 1..5")
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
    needs = any(r > 0 for m, rs in modes.items() if m != "real_shifted" for r in rs) or bool(
        modes.get("generations")
    )
    if not needs:
        return
    gen = cfg.generator
    check_choice(cfg, "generator.kind", ("train", "run"))
    check_choice(cfg, "generator.samples", ("auto", "saved", "model"))
    check_float(cfg, "generator.temperature", 0.0, strict=True)
    if gen.kind == "train":
        check_choice(cfg, "generator.family", sorted(registry.FAMILIES))
        check_int(cfg, "generator.steps", 1, optional=True)
        check_bool(cfg, "generator.per_class")
        if modes.get("generations"):
            raise ConfigError("modes.generations: needs generator.kind=run (a loop run directory)")
        return
    dirs = _plain(gen.run_dirs) or [gen.run_dir]
    if dirs == [None]:
        raise ConfigError("generator.run_dir: a loop run directory is needed with generator.kind=run")
    try:
        for i, d in enumerate(dirs):
            field = "generator.run_dir" if gen.run_dirs is None else f"generator.run_dirs[{i}]"
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
        severity=cfg.eval.severity,
    )
    modes = {m: [float(r) for r in rs] for m, rs in (config["modes"] or {}).items() if rs}
    run_path = Path(run_path)
    needs_generator = (
        any(r > 0 for m, rs in modes.items() if m != "real_shifted" for r in rs) or "generations" in modes
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
            seed=cfg.seed,
            attribute_of=setup.attribute_of,
            progress=cfg.progress,
        )
    default_t = source.default_generation() if source else None
    generations = source.generations() if source and "generations" in modes else []
    cells = grid.plan(modes, list(cfg.seeds), config["eval"]["baselines"] or [], default_t, generations)
    with RunDir(run_path) as run:
        run.check_config(config)
        rows = grid.run_grid(
            run,
            setup,
            cells,
            source,
            config["classifier"],
            seed=cfg.seed,
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
