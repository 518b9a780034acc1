"""The one protocol every generative family follows, and the capabilities some declare (docs/architecture.md,
"Families").

Shapes: every tensor a family takes or returns carries a leading *chain*
dimension C. Toy families (gaussian, gmm, kde) run C independent chains in one
tensor program; neural families run one chain (C = 1). Data is (C, n, *event).

`GenerativeModel` is what the loop asks of every family. What only some can do is a capability of its own,
declared by the family (it names the protocol among its bases) and tested by the loop with `isinstance`:
`ResumableFit`, `IndexedSampling`, `Conditional`, `Batched`, `Exportable`, `FitsStatistics`.
tests/test_family_contract.py holds every family of registry.FAMILIES to the protocol and to the
capabilities it declares, on the small instance its `EXAMPLE` describes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from simulator.options import ConfigError, check_args, check_value, problem

OPTIONS_PREFIX = "model.options"  # where a family's constructor options sit in the run config


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss; the loop records the generation as diverged."""


@dataclass
class FitCheckpoint:
    """Where and how often a neural family's fit saves its training state inside a generation.

    The loop passes one to `fit(..., checkpoint=...)` of families with a `ResumableFit`, with `path` inside
    gen_XXX.tmp/. Every `every_steps` steps or `every_seconds` seconds (whichever comes first; None: never
    by that measure) the fit writes model, optimizer, EMA, grad scaler, step and RNG states to `path`
    atomically, with its checksum (simulator.scratch; fsynced: a checkpoint is there to survive). When
    `path` exists as fit starts and matches its checksum, fit resumes from it, and the finished fit equals
    an uninterrupted one (bit for bit on the CPU); a file that fails it (or has none) is set aside into
    `corrupt` (deleted when None) with one warning line, and the fit starts afresh. A finished fit removes
    the file. (Implemented by simulator.models.training.train: the file also holds the minibatch
    sampler's state and the losses so far.)
    """

    path: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    corrupt: Path | None = None  # where a checkpoint that fails its checksum goes (the run's corrupt/)


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


@dataclass(frozen=True)
class Example:
    """A small instance of a family: what tests/test_family_contract.py builds, fits and samples (seconds on
    a CPU). A family declares its own as the class attribute `EXAMPLE`; vector families get float32 data
    of `event_shape`, image families (three event dimensions) uint8 images, token families (`tokens` set)
    float32 token ids in [0, tokens)."""

    event_shape: tuple[int, ...] = (2,)
    chains: int = 2
    options: dict[str, Any] | None = None  # constructor options besides chains and event_shape
    rows: int = 32  # training rows per chain
    steps: int | None = None  # fit steps (None: the family's default; closed forms ignore it)
    tokens: int | None = None  # a token family's vocabulary: rows are token ids (simulator/data/tokens.py)


# -- capabilities: what some families can do beyond GenerativeModel, each tested with isinstance ----------


@runtime_checkable
class ResumableFit(Protocol):
    """A fit that survives an interruption and carries its optimizer across generations (the torch families,
    simulator.models.training.TrainedFamily): fit(..., checkpoint=FitCheckpoint) resumes from the
    checkpoint, bit for bit on the CPU; optimizer_state=dict | None starts from an earlier fit's optimizer
    (train.carry_optimizer); warmup=int | None is the learning-rate warm-up (None: the family's option);
    ema="carry" | "restart" the EMA of the weights. The last fit's optimizer state is `optimizer_state`."""

    optimizer_state: dict[str, Any] | None

    def fit(
        self,
        data: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        generator: torch.Generator,
        progress: bool = False,
        checkpoint: FitCheckpoint | None = None,
        optimizer_state: dict[str, Any] | None = None,
        warmup: int | None = None,
        ema: str = "carry",
        weights: torch.Tensor | None = None,
    ) -> dict[str, Any]: ...


@runtime_checkable
class IndexedSampling(Protocol):
    """Per-sample seeds: sample(n, ..., indices=rows) returns rows `rows` of sample(n, ...) (the same
    generator), so the loop draws a generation's samples in shards, each rank its round-robin part
    (simulator.samples), and a kill resumes from the last whole shard."""

    per_sample_seeds: bool  # True (the marker a structural check reads)

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class Conditional(Protocol):
    """Class-conditional when num_classes is set: fit takes the labels (C, n) of its rows and sample draws
    the classes it is given (the loop draws them in the real set's proportions)."""

    num_classes: int | None


@runtime_checkable
class Batched(Protocol):
    """Trained in minibatches of batch_size rows: train.epochs and train.images count steps in them."""

    batch_size: int


@runtime_checkable
class Exportable(Protocol):
    """Writes each committed generation in another format too (e.g. a diffusers pipeline directory)."""

    def export(self, directory: Path) -> Path | None:
        """Write the export into directory (gen_XXX.tmp, before the commit); None when switched off."""


@runtime_checkable
class FitsStatistics(Protocol):
    """Fits to, and samples, sufficient statistics (model.path=statistics): a generation draws the
    statistics of its training set and of its samples, never the points, exactly in distribution because
    the family's fit sees its data only through them (the Gaussian's mean and scatter). Statistics of
    disjoint sets sum (`a + b`, in order) and have a `count` of points; `to_dict()` gives them as tensors.

    The parameters fit_statistics sets are kept at the statistics' precision: statistics_state() is the
    exact state a resume continues from (gen_XXX/statistics.pt), state_dict() the model file's."""

    statistics_metrics: ClassVar[tuple[str, ...]]  # metrics metrics_from_statistics computes exactly
    sample_statistics_metrics: ClassVar[tuple[str, ...]]  # of those, the ones that read S_t's statistics

    def statistics_of(self, x: torch.Tensor) -> Any:
        """The statistics of points x (C or 1, n, *event), one per chain."""

    def truth_statistics(self, truth: Any, n: int, generator: torch.Generator) -> Any:
        """The statistics of n new points of the data's exact sampler, per chain (policy.source=truth)."""

    def load_statistics(self, state: dict[str, Any]) -> Any:
        """Statistics from their to_dict()."""

    def fit_statistics(self, stats: Any) -> dict[str, Any]:
        """Fit to the points `stats` summarises; returns the training stats, as fit does."""

    def sample_statistics(
        self, sizes: Sequence[int], *, generator: torch.Generator, temperature: float = 1.0
    ) -> list[Any]:
        """The statistics of the first `size` rows of one draw of samples, for each of sizes."""

    def statistics_state(self) -> dict[str, torch.Tensor]:
        """The fitted parameters at the statistics' precision."""

    def load_statistics_state(self, state: dict[str, Any]) -> None:
        """Restore statistics_state() (or a model file's parameters, e.g. init.checkpoint's)."""

    def metrics_from_statistics(
        self, names: Sequence[str], evaluated: Any, data: Any, params0: Any, params_star: Any
    ) -> dict[str, torch.Tensor]:
        """The metric columns {name: (C,)} of names, as the sample path computes them from samples, from the
        parameters and `evaluated` (the statistics of S_t's first eval.n_samples rows, or None)."""


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


def psd_factor(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A lower-triangular L with L L^T = cov for (..., d, d), and a mask of matrices not positive definite.

    Positive-definite matrices get their Cholesky factor. A chain that has collapsed (a covariance
    that is singular in floating point, which fully synthetic retraining reaches) gets a triangular
    square root through eigh + QR instead, so it can still be sampled; its density is degenerate.
    """
    factor, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bad.any():
        evals, evecs = torch.linalg.eigh(cov[bad])
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # root @ root^T = cov
        factor = factor.clone()
        factor[bad] = torch.linalg.qr(root.transpose(-2, -1)).R.transpose(-2, -1)
    return factor, bad


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
