"""The run config's schema: RunConfig, one dataclass per section, and the run directory's name.

Hydra composes the config from the groups in configs/; simulator.checks walks the result before any work
starts: this schema first (simulator.options.check: unknown keys, types, bounds, choices, one line each),
then each part's own options and rules, declared next to its code. The schema is not registered in hydra's
ConfigStore, because a violation there surfaces as hydra's multi-line error with exit code 1, while a bad
field must be one line and exit code 2 (docs/architecture.md, "Errors"). Every key here has its default in
a configs/ file (tests/test_schema.py holds the two to the same keys).

A schema and nothing else: this module imports only simulator.options, the step logger's section and the
mitigations' (simulator.mitigations: their options, with no check or registry behind them), so
anything may import it (simulator.keys names runs with run_name) without reaching the checks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.mitigations.options import Mitigation
from simulator.options import ConfigError, opt
from simulator.step_log import Logger

__all__ = ["ConfigError", "RunConfig", "run_name"]

DEVICES = ("auto", "cpu", "cuda")
REWARDS = ("model", "truth", "linear", "quadratic", "classifier")  # simulator.curation


@dataclass
class Init:
    checkpoint: str | None = None  # a model file (model.safetensors or model.pt) to start generation 0 from
    pretrained: str | None = None  # a diffusers directory (diffusion runs)
    pretrained_sha256: str | None = None  # written by the program: the pretrained weights' hash


@dataclass
class Data:
    source: str = "two_moons"  # a data source's name (registry.source_names())
    n_train: int | None = opt(500, low=1)  # null: all the source has (image sources)
    n_test: int | None = opt(2000, low=1)
    options: dict = opt({})  # the source's constructor options (options_schema of its class)


@dataclass
class Model:
    family: str = "flow"  # a key of registry.FAMILIES
    path: str | None = opt(None, choices=("samples", "statistics"))  # gaussian only (simulator.checks)
    options: dict = opt({})  # the family's constructor options (options_schema of its class)


@dataclass
class Train:
    epochs: float | None = opt(None, low=0, strict=True)
    images: int | None = opt(None, low=1)
    steps: int | None = opt(150, low=1)
    steps_gen0: int | None = opt(1000, low=1)
    warm_start: bool = True
    carry_optimizer: bool | None = None
    warmup: int | None = opt(None, low=0)
    ema: str | None = opt(None, choices=("carry", "restart"))
    checkpoint_every: int | None = opt(None, low=1)
    checkpoint_minutes: float | None = opt(10, low=0, strict=True)


@dataclass
class Sample:
    n: int | None = opt(None, low=1)
    temperature: float = opt(1.0, low=0, strict=True)
    guidance: float | None = opt(None, low=0)
    curation_k: int = opt(1, low=1)
    curation_reward: str = opt("model", choices=REWARDS)
    curation_beta: Any = None  # simulator.curation.check (with the reward's options)
    curation_options: Any = opt({})
    correction: str | None = None  # simulator.correction.check (with its strength and options)
    correction_strength: Any = None
    correction_options: Any = opt({})
    label_noise: float | None = opt(None, low=0, high=1, strict_high=True)  # simulator.verification.check
    verifier: str | None = None
    verifier_options: Any = opt({})
    selection: str | None = opt(None, choices=("greedy", "threshold"))  # simulator.selection
    selection_k: int | None = opt(None, low=2)  # null: 2
    selection_threshold: float | None = opt(None, low=0, strict=True)
    selection_decay: float | None = opt(None, low=0, high=1, strict=True, strict_high=True)  # null: 0.95
    from_last: int | None = opt(None, low=1)
    save: bool = True
    shard_size: int | None = opt(None, low=1)


@dataclass
class Eval:
    metrics: list[str] = opt(["nll"])  # metric names (metrics.registry)
    n_samples: int | None = opt(None, low=1)
    stability_metric: str | None = None
    report_metrics: list[str] | None = None
    figures: bool = True
    options: dict = opt({})  # the metrics' options (metric_schema)


@dataclass
class RunConfig:
    """configs/config.yaml and its groups; `policy` is the named policy's constructor options + name."""

    name: str = "default"
    run_root: str = "runs"
    seed: int = opt(0, low=0)
    chains: int = opt(1, low=1)
    generations: int = opt(10, low=1)
    device: str = "cpu"  # DEVICES or cuda:N: registry.resolve_device checks the form and the machine
    progress: bool = True
    durable: bool = True
    threads: int | None = opt(None, low=1)
    share_gen0: bool | None = None
    init: Init = opt(Init())
    data: Data = opt(Data())
    model: Model = opt(Model())
    policy: dict = opt({})
    train: Train = opt(Train())
    sample: Sample = opt(Sample())
    eval: Eval = opt(Eval())
    logger: Logger = opt(Logger())
    mitigation: Mitigation = opt(Mitigation())  # simulator.mitigations: neon, sims


def metric_schema() -> type:
    """eval.options: the options every metric declares (simulator.metrics.registry), one schema."""
    from simulator.metrics import registry as metric_registry

    return metric_registry.options_schema()


# characters a run directory's name keeps as they are: none that a shell or Python's glob reads as a pattern
# ([ ] * ? { } ...) or that a shell splits or expands; every other one is written %XX (% itself too, so
# the name stays unique: two command lines never share a directory)
_NAME_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-,=+@:")


def _escape(text: str) -> str:
    """text with every character outside _NAME_SAFE as %XX (its UTF-8 bytes), like a URL's."""
    return "".join(c if c in _NAME_SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _bounded(name: str) -> str:
    """Names longer than 200 characters keep their first 180 and a hash of the whole."""
    if len(name) > 200:
        name = f"{name[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def legacy_run_name(override_dirname: str) -> str:
    """The name versions before glob-safe names gave a run (brackets and other characters kept)."""
    return _bounded(override_dirname.replace("/", "_") or "base")


def run_name(override_dirname: str, parent: str | None = None) -> str:
    """Directory name of a run inside its experiment folder: the overrides, or 'base' for none.

    A name a user can type and glob: characters a shell or glob reads as patterns are written %XX
    (`eval.metrics=[fid]` -> `eval.metrics=%5Bfid%5D`), '/' as '_'. Names longer than 200 characters keep
    their first 180 and a hash of the whole, so they stay deterministic (the same command finds the same
    run) and within file-system limits. parent (the experiment folder, given by configs/config.yaml): a run
    an earlier version made there under its unescaped name is resumed where it is, unless the new name
    exists too.
    """
    name = _bounded(_escape(override_dirname.replace("/", "_")) or "base")
    if parent is not None:
        old = legacy_run_name(override_dirname)
        folder = Path(os.path.expanduser(str(parent)))
        if old != name and (folder / old).is_dir() and not (folder / name).exists():
            return old
    return name
