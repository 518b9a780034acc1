"""The one protocol every generative family follows (docs/architecture.md, "Families").

Shapes: every tensor a family takes or returns carries a leading *chain*
dimension C. Toy families (gaussian, gmm, kde) run C independent chains in one
tensor program; neural families run one chain (C = 1). Data is (C, n, *event).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from simulator.options import ConfigError, check_args, check_value, problem

OPTIONS_PREFIX = "model.options"  # where a family's constructor options sit in the run config


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss; the loop records the generation as diverged."""


@dataclass
class FitCheckpoint:
    """Where and how often a neural family's fit saves its training state inside a generation.

    The loop passes one to `fit(..., checkpoint=...)` of families whose `resumable_fit` is True, with
    `path` inside gen_XXX.tmp/. Every `every_steps` steps or `every_seconds` seconds (whichever comes
    first; None: never by that measure) the fit writes model, optimizer, EMA, grad scaler, step and RNG
    states to `path` atomically, with its checksum (simulator.scratch; fsynced: a checkpoint is there to
    survive). When `path` exists as fit starts and matches its checksum, fit resumes from it, and the
    finished fit equals an uninterrupted one (bit for bit on the CPU); a file that fails it (or has none)
    is set aside into `corrupt` (deleted when None) with one warning line, and the fit starts afresh.
    """

    path: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    corrupt: Path | None = None  # where a checkpoint that fails its checksum goes (the run's corrupt/)
    # Implemented by simulator.models.training.train (the file also holds the minibatch sampler's
    # state and the losses so far); a finished fit removes the file. Families with resumable_fit = True
    # also take fit(..., optimizer_state=dict | None (carry an earlier fit's optimizer), warmup=int | None
    # (learning-rate warm-up steps; None: the family's option), ema="carry" | "restart") and keep their
    # last fit's optimizer state in `optimizer_state`.


@runtime_checkable
class GenerativeModel(Protocol):
    """A generative family. The loop talks to models only through these members."""

    chains: int
    exact_likelihood: bool  # False where log_prob is a bound (diffusion)

    def fit(
        self,
        data: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        generator: torch.Generator,
        progress: bool = False,
        weights: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Fit to data (C, n, *event); steps overrides the family's default (closed forms ignore it).

        weights: (C, n) or (n,) non-negative per-row weights (relative: only their ratios within a chain
        matter; see `check_weights`). None -- and weights equal within every chain -- is the unweighted fit,
        bit for bit. Closed forms weight their estimators; neural families draw minibatch rows with
        probability proportional to the weight (simulator.models.training.EpochBatches).
        """

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw (C, n, *event) samples; temperature s scales the covariance (s < 1: sampling bias)."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (C, n) of x (C, n, *event), or of x (n, *event) broadcast over chains."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def parameters_vector(self) -> torch.Tensor | None:
        """Parameters flattened to (C, P), for parameter distances; None where meaningless."""

    def reset(self, generator: torch.Generator) -> None:
        """Re-initialise from scratch (the loop calls this when warm_start is off)."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise Diverged when a training loss stops being finite."""
    if not torch.isfinite(loss).all():
        raise Diverged(f"non-finite loss at step {step}")


def broadcast_chains(x: torch.Tensor, chains: int, event_dims: int) -> torch.Tensor:
    """Give x of shape (n, *event) a chain dimension; leave (C, n, *event) unchanged."""
    if x.dim() == event_dims + 1:
        return x.unsqueeze(0).expand(chains, *x.shape)
    if x.dim() != event_dims + 2 or x.shape[0] not in (1, chains):
        raise ValueError(f"expected (n, *event) or ({chains}, n, *event), got {tuple(x.shape)}")
    return x.expand(chains, *x.shape[1:])


def check_weights(weights: torch.Tensor | None, chains: int, n: int) -> torch.Tensor | None:
    """Validated per-row weights as (C, n) float64 scaled to mean 1 per chain, or None for the unweighted fit.

    weights: (n,) (shared by every chain) or (C or 1, n); finite, >= 0, with a positive sum in every chain.
    Weights equal within every chain, to float64 rounding (a relative spread of at most 8 ulps), return
    None: they are the unweighted objective, and the family then runs its unweighted code, bit for bit.
    """
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[1] != n or w.shape[0] not in (1, chains):
        raise ValueError(f"weights: expected shape ({n},) or ({chains}, {n}), got {tuple(weights.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights: must be finite and >= 0")
    total = w.sum(1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("weights: every chain needs a positive total weight")
    w = w.expand(chains, n)
    spread = w.max(1).values - w.min(1).values
    if bool((spread <= 8 * torch.finfo(torch.float64).eps * w.max(1).values).all()):
        return None
    return w * (n / total)


def seeded_build(generator: torch.Generator, build: Callable[[], Any]) -> Any:
    """build() with the global CPU RNG seeded from one draw of generator (torch layers initialise through
    it): the RNG is forked, so the caller's stream is untouched, and only the CPU default generator is
    seeded (torch.manual_seed would also reseed every GPU). The torch families' reset."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return build()


def plain_state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """module's state dict as detached CPU copies (names prefixed), loadable with weights_only=True."""
    return {f"{prefix}{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    """All of module's parameters flattened to (1, P) on the CPU, for parameter distances."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).cpu().unsqueeze(0)


def world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    from simulator.distributed import world as _world

    return _world()


def check_options(cls: type, args: dict[str, Any], prefix: str = OPTIONS_PREFIX) -> None:
    """A family's constructor arguments (its locals() as its first statement) against the schema the config
    path checks model.options with (simulator.options.options_schema(cls): annotations, BOUNDS by option
    name, cls.OPTIONS): one ConfigError line naming prefix.<option>, the same from Python as from the
    config. chains and event_shape are the program's (set from the data): the constructor checks them."""
    check_args(prefix, cls, args, skip=("chains", "event_shape"))


def refuse(field: str, what: str, value: Any) -> ConfigError:
    """The one-line error of a rule between options (or between an option and the data or the machine)
    that a per-option schema cannot state: simulator.options.problem's line, as a ConfigError."""
    return ConfigError(problem(field, what, value))


def check_temperature(temperature: float) -> float:
    """The sampling temperature s (the base or covariance scale; s < 1 is sampling bias): a finite number
    >= 0, one line naming it."""
    return float(check_value("temperature", float, temperature, low=0))
