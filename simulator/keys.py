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

import math
from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from simulator.options import ConfigError

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


class BudgetError(ConfigError, InterpolationResolutionError):
    """A bad image budget, raised inside a resolver: OmegaConf passes its own error class through
    unwrapped, and the ConfigError base makes it the usual one line (exit code 2)."""

    def __str__(self) -> str:
        return super().__str__().splitlines()[0]  # OmegaConf appends full_key / object_type lines


def budget_epochs(budget: Any, lam: Any, n_real: Any, n_full: Any = None) -> int | None:
    """Bertrand et al.'s fine-tuning epochs for an image budget: round(budget / (n (1 + lam))), at least 1.

    Their retraining script (QB3/gen_models_dont_go_mad, iterative_retraining.py, DDPM arm) computes
    max(1, np.round(num_mimg * 1e6 / (50_000 (1 + prop_gen_data)))): whole epochs, rounded half to even
    (Python's round does the same), over the real set plus lam of it in samples. budget is the experiment's
    own key `image_budget`; n_real is data.n_train (null: n_full, the source's whole training set). A lam or
    n that is not valid gives None, so the field's own check (policy.lam, data.n_train) names the mistake; a
    bad budget, which no schema checks, is refused here.
    """
    n = n_full if n_real is None else n_real
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise BudgetError(
            f"image_budget: must be a whole number of images >= 1, got {budget!r} "
            "(train.epochs = round(image_budget / (n_real (1 + lambda))), Bertrand et al.)"
        )
    valid_lam = isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 <= lam < math.inf
    if not valid_lam or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    return max(1, round(budget / (n * (1 + lam))))


def register_resolvers() -> None:
    """Register the resolvers configs/ use; every entry point calls this before composing."""
    from simulator.config import run_name

    if not OmegaConf.has_resolver("sim_run_name"):
        OmegaConf.register_new_resolver("sim_run_name", run_name)
    if not OmegaConf.has_resolver("sim_dirname_excluded"):
        OmegaConf.register_new_resolver("sim_dirname_excluded", dirname_excluded)
    if not OmegaConf.has_resolver("sim_budget_epochs"):  # configs/experiment/cifar10_bertrand.yaml
        OmegaConf.register_new_resolver("sim_budget_epochs", budget_epochs)


register_resolvers()
