"""The one list of config keys that do not change a run's science, and what reads it.

A key is non-science when two runs that differ only in it compute the same generations: how long the
run goes (generations may grow on resume), where and how it is written, how it reports. Four places
need that list and read it from here:

- the run directory's name: hydra's `override_dirname.exclude_keys` (configs/config.yaml) is filled by
  the `sim_dirname_excluded` resolver, so `simulate generations=20` finds the run `generations=10` made;
- resuming: `RunDir.check_config` accepts a changed config when only these keys changed;
- a shared generation 0 (`share_gen0`) is keyed by the config without them (and without the policy);
- the report groups runs that differ only in the seed and these keys into one regime.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf

# keys that may change between invocations of one run (dotted paths into the config)
NON_SCIENCE: tuple[str, ...] = (
    "generations",  # T: raising it extends a finished run
    "progress",  # tqdm bars
    "device",  # cpu | cuda | auto (the run is bit for bit on the CPU; a GPU changes float rounding only)
    "threads",  # torch CPU threads
    "durable",  # fsync every commit
    "run_root",  # where run directories live
    "share_gen0",  # share generation 0 across a sweep's policies (a cache, not a different fit)
    "eval.figures",  # draw figures after the run
    "eval.report_metrics",  # extra metrics in the sweep's comparison figure
    "train.checkpoint_every",  # fit checkpoints inside gen_XXX.tmp (resume aids)
    "train.checkpoint_minutes",
    "logger.name",  # step-level training logs (logger=tensorboard): written beside the run, change no result
    "logger.every",
    "model.options.sample_batch",  # rows per network call in sampling and bpd: bounds memory (per-row seeds)
)

# command-line keys that are not config values of the run: the folder name itself, config groups that
# only patch other keys (their effect is in the resolved config.yaml), and hydra's own switches
NOT_IN_DIRNAME: tuple[str, ...] = ("name", "experiment", "debug", "launcher", "logger", "hydra.mode",
                                   "hydra.verbose")  # fmt: skip


def dirname_excluded() -> list[str]:
    """Keys left out of a run directory's name (hydra's override_dirname.exclude_keys)."""
    return [*NON_SCIENCE, *NOT_IN_DIRNAME]


def drop(config: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of the nested config without the dotted keys (absent ones are ignored); a section left
    empty goes too, so adding a section of non-science keys (e.g. `logger`) changes nothing compared."""
    out = dict(config)
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in out:
            continue
        if not rest:
            del out[head]
        elif isinstance(out[head], dict):
            out[head] = drop(out[head], [rest])
            if not out[head]:
                del out[head]
    return out


def register_resolvers() -> None:
    """Register the resolvers configs/config.yaml uses; every entry point calls this before composing."""
    from simulator.config import run_name

    if not OmegaConf.has_resolver("sim_run_name"):
        OmegaConf.register_new_resolver("sim_run_name", run_name)
    if not OmegaConf.has_resolver("sim_dirname_excluded"):
        OmegaConf.register_new_resolver("sim_dirname_excluded", dirname_excluded)


register_resolvers()
