"""The contamination grid's config schema (configs/contaminate.yaml and configs/contaminate/), checked by
simulator.options.check like the run config: unknown keys, types, bounds and choices, one line each.
What one value decides for another (a mode's ratios, distinct seeds, the generator's files) stays as
explicit rules in simulator.contamination.cli.validate, after this pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulator.classifiers import Classifier
from simulator.contamination import shifts
from simulator.contamination.sources import KINDS, SAMPLES
from simulator.options import opt

SEVERITY: dict[str, Any] = shifts.SEVERITY  # CIFAR-10-C's levels, 1..5


@dataclass
class Control:
    shift: str | None = opt(None, choices=tuple(shifts.SHIFTS))
    severity: int = opt(3, **SEVERITY)


@dataclass
class Data:
    source: str = "digits"  # contamination.cli.sources()
    n_train: int | None = opt(None, low=1)
    n_test: int | None = opt(None, low=1)
    options: dict = opt({})  # the source's constructor options


@dataclass
class Generator:
    kind: str = opt("train", choices=KINDS)
    path: str | None = None  # kind=external: a folder or .npz
    seed: int | None = opt(None, low=0)
    replicates: list[str] | None = None  # kind=run: one loop run directory per replicate seed
    samples: str = opt("auto", choices=SAMPLES)
    temperature: float = opt(1.0, low=0, strict=True)
    family: str | None = None  # kind=train: a key of registry.FAMILIES
    per_class: bool = False
    steps: int | None = opt(None, low=1)
    options: dict = opt({})  # kind=train: the family's constructor options
    run_dir: str | None = None
    run_dirs: list[str] | None = None
    generation: Any = "last"  # an integer or "last" (sources.pick_generation)
    generations: list[Any] | None = None


@dataclass
class Modes:
    substitute: list[float] = opt([])  # ratio ranges: mixing.check_ratio
    augment: list[float] = opt([])
    control: list[float] = opt([])
    generations: list[float] = opt([])


SPLIT_DRAWS = ("fixed", "per_replicate")


@dataclass
class Split:
    fraction: float = opt(0.5, low=0, high=1, strict=True)
    # fixed: every replicate shares the data seed's classifier/reserve split and test shifts (the old
    # behaviour); per_replicate: replicate s draws its own (grid.prepare_replicates)
    draw: str = opt("fixed", choices=SPLIT_DRAWS)
    # fixed: the source's own train/test partition; per_replicate: replicate s reads the source with its own
    # split_seed, so the test images (and its generator's training images) change too
    test: str = opt("fixed", choices=SPLIT_DRAWS)


@dataclass
class Eval:
    shifts: list[str] = opt([])  # names of shifts.SHIFTS, or released sets (released.is_released)
    severity: int | list[int] = opt(5, **SEVERITY)
    cifar10c_root: str | None = None  # the released sets' folders (released.py)
    cifar10_1_root: str | None = None
    baselines: list[dict] | None = None  # Classifier keys each
    save_models: bool = False
    figures: bool = True


@dataclass
class ContaminateConfig:
    task: str = "contaminate"
    name: str = "contaminate"
    run_root: str = "runs"
    seed: int = opt(0, low=0)
    seeds: list[int] = opt([0, 1, 2], low=0)
    device: str = opt("cpu", choices=("auto", "cpu", "cuda"))
    threads: int | None = opt(None, low=1)
    progress: bool = True
    modes: Modes = opt(Modes())
    split: Split = opt(Split())
    eval: Eval = opt(Eval())
    classifier: Classifier = opt(Classifier())
    control: Control = opt(Control())
    data: Data = opt(Data())
    generator: Generator = opt(Generator())
