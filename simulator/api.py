"""`simulator.run(...)`: one run of `simulate` from Python, with the same config, checks and run directory.

The overrides are hydra's (a list of "key=value" strings, as on the command line) or a mapping of
dotted keys to values, which is turned into those strings, so `run({"policy": "mix", "policy.lam": 0.5})`
and `simulate policy=mix policy.lam=0.5` compose the same config, pass the same preflight and use (and
resume) the same run directory, `<run_root>/<name>/<overrides>`. A bad value raises the project's
ConfigError (or RunError, PolicyError) with the one line `simulate` would print.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from simulator.config import ConfigError


@dataclass
class RunResult:
    """What one run left behind: its directory, its results rows and its summary (as the files hold them)."""

    path: Path  # the run directory, <run_root>/<name>/<overrides>
    rows: list[dict[str, Any]]  # results.jsonl, one row per generation (docs/results.md)
    summary: dict[str, Any]  # summary.json: the stability metric's rate and verdict, status, policy
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (config.yaml)

    def column(self, key: str) -> list[Any]:
        """One results column over the generations (None where a row lacks it)."""
        return [row.get(key) for row in self.rows]


_BARE = re.compile(r"[A-Za-z_./~][\w./~+\-:@%]*")  # a string hydra's grammar reads as itself, unquoted
_SPECIAL = {"null", "true", "false", "inf", "nan", "-inf"}


def _value(v: Any) -> str:
    """A Python value in hydra's override grammar (what one would type after `key=`)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if _BARE.fullmatch(v) and v.lower() not in _SPECIAL:
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"overrides: value {v!r} of type {type(v).__name__} is not a config value")


def _flatten(mapping: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"overrides: keys must be non-empty strings, got {key!r}")
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and value and not key.startswith(("+", "~")):
            out += _flatten(value, path)  # {"policy": {"lam": 0.5}} -> policy.lam=0.5
        else:
            out.append(f"{path}={_value(value)}")
    return out


def as_overrides(overrides: Sequence[str] | Mapping | DictConfig | None) -> list[str]:
    """The command-line overrides that overrides (a list of strings or a mapping) stands for."""
    if overrides is None:
        return []
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=False)  # type: ignore[assignment]
    if isinstance(overrides, Mapping):
        return _flatten(overrides)
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides: must be a list of 'key=value' strings or a mapping, got {overrides!r}")
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ConfigError(f"overrides: {flags[0]!r} is a command-line flag; simulator.run takes overrides")
    return list(overrides)


def run(overrides: Sequence[str] | Mapping | DictConfig | None = None) -> RunResult:
    """Compose configs/config.yaml with overrides, run the preflight and the loop, return the run.

    One job: a command line that is a sweep (the default experiment's five regimes x three seeds, or
    `seed=0,1,2`) is refused; pin the swept keys, or take `experiment=single`. Running it again resumes
    the same run directory, as `simulate` does.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from simulator import cli, keys
    from simulator.options import CONFIG_DIR
    from simulator.preflight import check_jobs, sweep_jobs

    args = as_overrides(overrides)
    keys.register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            jobs = sweep_jobs(args, "config")
        except Exception:  # hydra's own error (bad syntax, unknown key): check_jobs words it in one line
            jobs = None
    if jobs is not None and len(jobs) > 1:  # refused before the preflight builds every job
        raise ConfigError(
            f"overrides: {' '.join(args) or '(none)'} is a sweep of {len(jobs)} jobs; simulator.run runs "
            "one: pin every swept key (e.g. policy=mix seed=0) or use experiment=single"
        )
    check_jobs(args, "config", cli.build)  # every mistake is one ConfigError line, before anything is made
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        full = compose("config", overrides=(jobs or [[]])[0], return_hydra_config=True)
    HydraConfig.instance().set_config(full)  # ${hydra:job.override_dirname} resolves against this job
    hydra_cfg = full.hydra
    multirun = str(hydra_cfg.mode).endswith("MULTIRUN")
    path = Path(f"{hydra_cfg.sweep.dir}/{hydra_cfg.sweep.subdir}" if multirun else str(hydra_cfg.run.dir))
    with open_dict(full):
        del full["hydra"]
    summary = cli.run_config(full, path)
    config = OmegaConf.to_container(full, resolve=True)
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines() if line.strip()]
    return RunResult(path=path, rows=rows, summary=summary, config=config)  # type: ignore[arg-type]
