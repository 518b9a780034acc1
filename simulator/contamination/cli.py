"""Hydra entry point `simulate-contaminate`: config -> real data, generator, cell grid -> run directory.

Thin like simulator.cli: validation here, the work in grid.py. A user's mistake (a ratio outside its
range, a missing loop run directory, an unknown shift) ends in one line on stderr and exit code 2 before
anything is written. Run it as `simulate-contaminate ...` or `python -m simulator.contamination.cli ...`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from simulator import classifiers, entry, registry, seeding, strict_json
from simulator.checks import check_name
from simulator.config import ConfigError
from simulator.contamination import grid, released, report, shifts
from simulator.contamination.mixing import RENAMED, ContaminationError, check_ratio
from simulator.contamination.robustness import MIN_POINTS
from simulator.contamination.schema import Classifier, ContaminateConfig
from simulator.contamination.sources import (
    GeneratorSource,
    load_external,
    loop_generations,
    pick_generation,
)
from simulator.data.base import Dataset
from simulator.entry import CONFIG_DIR
from simulator.options import check, choose, interpolated, options_schema, problem
from simulator.preflight import cached, check_run_root
from simulator.rundir import RunDir, RunError

CONFIG_NAME = "contaminate"
USER_ERRORS = (*entry.USER_ERRORS, ContaminationError)
log = logging.getLogger("simulator")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad field of a composed contamination config: the schema
    (simulator.contamination.schema), then the rules between values."""
    for mode in _plain(cfg.get("modes")) or {}:
        if mode in RENAMED:
            raise ConfigError(f"modes.{mode}: renamed to modes.{RENAMED[mode]}")
    check("", ContaminateConfig, cfg, noun="key", extra=interpolated(cfg))
    check_name(cfg.get("name"))
    seeds = _plain(cfg.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(problem("seeds", "a non-empty list of distinct integers >= 0", seeds))
    choose("data.source", cfg.data.source, sources())
    modes = _plain(cfg.modes) or {}
    for mode, ratios in modes.items():
        for r in ratios:
            try:
                check_ratio(mode, r)
            except ContaminationError as e:
                raise ConfigError(str(e)) from None
    _validate_split(cfg, modes)
    if cfg.split.fraction == 1 and any(r > 0 for r in modes.get("control") or []):
        raise ConfigError(
            "split.fraction: 1.0 leaves no held-out real images for modes.control; use a fraction < 1 "
            "or modes.control=[]"
        )
    severity = _plain(cfg.eval.severity)
    if isinstance(severity, list) and (not severity or len(set(severity)) != len(severity)):
        raise ConfigError(
            problem("eval.severity", "an integer in [1, 5] or a list of distinct ones", severity)
        )
    for name in cfg.eval.shifts:
        if name not in shifts.SHIFTS and not released.is_released(name):  # released: checked by build
            raise ConfigError(f"eval.shifts: unknown shift {name!r}; known: {', '.join(shifts.SHIFTS)}")
    baselines = _plain(cfg.eval.baselines) or []
    for i, b in enumerate(baselines):
        check(f"eval.baselines[{i}]", Classifier, b, noun="key")
    if baselines and len(baselines) * len(seeds) + 1 < MIN_POINTS:
        raise ConfigError(
            f"eval.baselines: effective robustness needs >= {MIN_POINTS} real-only models "
            f"(baselines x seeds + 1); got {len(baselines) * len(seeds) + 1}; or set []"
        )
    _validate_generator(cfg, modes)


def _needs_generator(modes: dict[str, list]) -> bool:
    return any(r > 0 for m, rs in modes.items() if m != "control" for r in rs) or bool(
        modes.get("generations")
    )


def _validate_split(cfg: DictConfig, modes: dict[str, list]) -> None:
    """split.test=per_replicate needs a source with its own partition and a generator per replicate trained
    on that replicate's training images: any other generator may have trained on another replicate's test
    images."""
    if cfg.split.test != "per_replicate":
        return
    source = cfg.data.source
    has_partition = source in sources() and "split_seed" in {
        f.name for f in dataclasses.fields(options_schema(registry.source_class(source)))
    }
    if not has_partition:
        raise ConfigError(
            f"split.test: per_replicate needs a data source with its own train/test partition (a split_seed "
            f"option, e.g. digits, colored_digits); {source}'s test set is fixed: use split.test=fixed"
        )
    if _needs_generator(modes) and (cfg.generator.kind != "train" or cfg.generator.seed is not None):
        raise ConfigError(
            "split.test: per_replicate needs every replicate to train its own generator on the spot "
            "(generator.kind=train, generator.seed=null): another generator was trained on one partition, "
            "whose test images other replicates would test on; use split.test=fixed"
        )


def _validate_generator(cfg: DictConfig, modes: dict[str, list]) -> None:
    """The generator block, when some cell needs generated images (a missing run dir is caught here)."""
    if not _needs_generator(modes):
        return
    gen = cfg.generator  # kind, seed, samples, temperature: the schema (validate)
    if gen.kind == "external":
        path = gen.get("path")
        if not path or not Path(os.path.expanduser(str(path))).exists():
            raise ConfigError(f"generator.path: no such folder or .npz file: {path}")
        if modes.get("generations"):
            raise ConfigError("modes.generations: needs generator.kind=run (a loop run directory)")
        return
    if gen.kind == "train":
        choose("generator.family", gen.family, sorted(registry.FAMILIES))
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
    """Data sources the contamination paths can read: the registry's (the coloured digits among them)."""
    return registry.source_names()


def load_data(cfg: DictConfig, replicate: int | None = None) -> Dataset:
    """The real labelled data named by cfg.data (one chain), through the registry like the loop's; with a
    replicate seed s (split.test=per_replicate) its train/test partition is s's own: the source's
    split_seed derived from (its split_seed, s)."""
    data = _plain(cfg.data)
    if replicate is not None:
        options = dict(data.get("options") or {})
        options["split_seed"] = seeding.derive_seed(
            int(options.get("split_seed") or 0), "replicate-test", replicate
        )
        data = {**data, "options": options}
    node = OmegaConf.create({"data": data, "chains": 1, "seed": cfg.seed})
    return registry.make_data(node)


def build(cfg: DictConfig, run_path: Path | None = None, cache: dict | None = None) -> tuple[Any, ...]:
    """Validate cfg and build what its grid needs before any cell: (device, setups, source, cells), setups
    the real data of every replicate seed (grid.prepare_replicates: one shared Setup unless split.draw or
    split.test is per_replicate).

    The preflight calls this for every job of a sweep (with a cache; run_path None: nothing is written
    either way, GeneratorSource only remembers where its pools will go); run_contaminate calls it for its
    own job. Besides the config: the data loaded and split, the test shifts applied, every classifier of
    the grid constructed, the generator's options (kind=train: its model constructed once), the external
    images' class counts and the held-out reserve against what the cells need, run_root writable.
    """
    validate(cfg)
    check_run_root(cfg)
    device = registry.resolve_device(cfg.device)
    config = _plain(cfg)
    seeds = list(cfg.seeds)

    def load(s: int | None) -> Dataset:  # the source's partition (None) or replicate s's own
        return cached(cache, ("data", config["data"], s), lambda: load_data(cfg, s))

    keys = ("seed", "split", "control", "eval")
    try:
        setups = cached(cache, ("setups", config["data"], seeds, *(config[k] for k in keys)),
                        lambda: grid.prepare_replicates(
            load, seeds, seed=cfg.seed, draw=cfg.split.draw, test=cfg.split.test,
            split_fraction=cfg.split.fraction, control_shift=cfg.control.shift,
            control_severity=cfg.control.severity, shift_names=list(cfg.eval.shifts),
            severity=_plain(cfg.eval.severity), cifar10c_root=cfg.eval.cifar10c_root,
            cifar10_1_root=cfg.eval.cifar10_1_root,
        ))  # fmt: skip
    except released.ReleasedError as e:  # a released test set missing, misnamed or of the wrong shape
        raise ConfigError(str(e)) from None
    except ValueError as e:  # a shift the images cannot take (grayscale of 1-channel digits)
        raise ConfigError(f"eval.shifts: {e}") from None
    setup = setups[seeds[0]]
    shape = tuple(setup.test.images.shape[1:])
    for field, extra in [("classifier", {}), *((f"eval.baselines[{i}]", b) for i, b in
                                                enumerate(config["eval"]["baselines"] or []))]:  # fmt: skip
        check_classifier(field, {**config["classifier"], **extra}, shape, setup.num_classes)
    modes = {m: [float(r) for r in rs] for m, rs in (config["modes"] or {}).items() if rs}
    needs_generator = (
        any(r > 0 for m, rs in modes.items() if m != "control" for r in rs) or "generations" in modes
    )
    source = None
    if needs_generator:
        source = GeneratorSource(
            config["generator"],
            Path(run_path) if run_path is not None else Path(str(cfg.run_root)) / str(cfg.name),
            setup.full,
            setup.num_classes,
            shape,
            device=device,
            seeds=list(cfg.seeds),
            attribute_of=setup.attribute_of,
            progress=cfg.progress,
            reals={s: x.full for s, x in setups.items()} if cfg.split.test == "per_replicate" else None,
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
    grid.check_reserve(cells, setups)
    if source is not None:
        check_generator(cfg, source, grid.pool_needs(cells, setups), shape, device, cache)
    return device, setups, source, cells


def check_classifier(field: str, opts: dict[str, Any], shape: tuple[int, ...], num_classes: int) -> None:
    """One classifier of the grid: its options against the schema, and the network constructed once."""
    check(field, Classifier, opts, noun="key")
    net_opts = {k: opts[k] for k in grid.NET_KEYS if k in opts}
    try:
        classifiers.make_classifier(
            opts["arch"], shape, num_classes, generator=torch.Generator(), prefix=field, **net_opts
        )
    except (TypeError, ValueError) as e:
        message = str(e)  # the classifier's own lines name field.<key> already
        raise ConfigError(message if message.startswith(f"{field}.") else f"{field}: {message}") from None


def check_generator(
    cfg: DictConfig, source: GeneratorSource, needs: dict, shape: tuple[int, ...], device: str,
    cache: dict | None,
) -> None:  # fmt: skip
    """The generator can give what the cells need: kind=train its model's options (one model built),
    kind=external enough images of every class."""
    gen = _plain(cfg.generator)
    if gen["kind"] == "train":
        family = gen["family"]
        opts = dict(gen.get("options") or {})
        schema = options_schema(registry.family_class(family))
        check("generator.options", schema, opts, fixed=("chains", "event_shape"))
        if not gen.get("per_class"):
            opts["num_classes"] = source.num_classes
        model = OmegaConf.create({"model": {"family": family, "options": opts}, "chains": 1})
        try:
            cached(
                cache, ("generator", gen, shape), lambda: registry.make_model_factory(model, shape, device)
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("model.options", "generator.options", 1)) from None
    elif gen["kind"] == "run":  # a loop run of other data: its images would only be found at the first cell
        for d in {p for paths in source.run_dirs.values() for p in paths}:
            loop: Any = OmegaConf.load(d / "config.yaml")
            if loop.get("data") is None:
                continue
            node = OmegaConf.create({"data": _plain(loop.data), "chains": 1, "seed": 0})
            got = cached(
                cache,
                ("loop-data", _plain(loop.data)),
                lambda n=node: registry.make_data(n).event_shape,  # type: ignore[misc]
            )
            if tuple(got) != shape:
                raise ConfigError(
                    f"generator.run_dir: {d} was trained on data.source={loop.data.source} (images "
                    f"{tuple(got)}), this grid's data ({cfg.data.source}) has images {shape}"
                )
    elif gen["kind"] == "external":
        pool = cached(cache, ("external", gen["path"], source.num_classes, shape),
                      lambda: load_external(gen["path"], source.num_classes, shape))  # fmt: skip
        have = [int((pool.labels == y).sum()) for y in range(source.num_classes)]
        for need in needs.values():
            short = [y for y, (n, h) in enumerate(zip(need, have, strict=True)) if n > h]
            if short:
                y = short[0]
                raise ConfigError(
                    f"generator.path: holds {have[y]} images of class {y}, the grid needs {need[y]}"
                )


def run_contaminate(cfg: DictConfig, run_path: str | Path) -> dict[str, Any]:
    """Validate cfg, build the real data, generator and grid, and run (or resume) it in run_path."""
    run_path = Path(run_path)
    device, setups, source, cells = build(cfg, run_path)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = _plain(cfg)
    check_mode_names(run_path)
    with RunDir(run_path, key="cell") as run:
        run.check_config(config)
        rows = grid.run_grid(
            run,
            setups,
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


def check_mode_names(run_path: Path) -> None:
    """Refuse in one line to resume a grid whose config.yaml names a mode by its earlier name (its cells.json
    and rows say e.g. replace where this version says substitute); simulate-report still reads it."""
    try:
        modes = (yaml.safe_load((run_path / "config.yaml").read_text()) or {}).get("modes") or {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # absent or damaged: RunDir says so
        return
    old = [m for m in modes if m in RENAMED] if isinstance(modes, dict) else []
    if old:
        raise RunError(
            f"run directory {run_path} was written before contamination mode {old[0]} was renamed "
            f"{RENAMED[old[0]]}; simulate-report still reads it; run the grid in another directory"
        )


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run_path, summary = entry.job(cfg, run_contaminate, USER_ERRORS)
    log.info(
        "%s: %s", run_path, strict_json.dumps({k: summary[k] for k in ("cells", "status") if k in summary})
    )


def check_overrides(args: list[str]) -> None:
    """A command line that sets a mode by its earlier name (modes.replace=...): one line naming today's.
    Hydra would only say that the key is not in the config."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("~+")
        mode = key[len("modes.") :] if key.startswith("modes.") else None
        if mode in RENAMED:
            raise ConfigError(f"modes.{mode}: renamed to modes.{RENAMED[mode]}")


def _build(cfg: DictConfig, cache: dict) -> Any:
    return build(cfg, None, cache)


def preflight(args: list[str]) -> None:
    """Compose, validate and build every job of the sweep before hydra makes anything (entry.preflight)."""
    entry.preflight(args, CONFIG_NAME, _build, USER_ERRORS, check_overrides)


def simulate_contaminate() -> None:
    """Console entry point of `simulate-contaminate`."""
    entry.console(_main, CONFIG_NAME, _build, USER_ERRORS, check_overrides)


class SweepReport(entry.SweepCallback):
    """Hydra callback: after a contamination multirun, draw the figures over all its runs."""

    def report(self, config: DictConfig, sweep: Path, runs: list[Path]) -> str:
        return f"contamination figures: {report.draw(runs, sweep / 'figures')}"


if __name__ == "__main__":
    simulate_contaminate()
