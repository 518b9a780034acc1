"""Step-level training logs (`logger=tensorboard`): loss, learning rate and throughput of every fit.

The shared training loop (simulator.models.training.train) reports to the logger that is active while it
runs (`active()`, set with `logging_to`), so no family's fit signature carries a logger. The generation
loop opens one TensorBoard writer per generation, <run_dir>/tensorboard/gen_XXX, whose step is the fit's
own step (0 .. steps-1): TensorBoard then shows the generations as separate runs over the same axis, so the
fine-tuning curves of generations 1..T lie on top of each other. A resumed fit appends to its generation's
folder from the step it resumed at.

Logging changes no result: it reads the losses the fit keeps anyway, once every `every` steps (one host
copy each time on CUDA, none in between), and draws nothing from any generator.

The logger takes plain arguments and declares its own options (`Logger`, the run config's logger section:
simulator.config reads it from here), so the trainer that imports this module reaches no config module.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.options import check, opt

EXTRA = 'logger=tensorboard needs the tensorboard extra: pip install -e ".[tensorboard]" -c constraints.txt'
LOGGERS = ("none", "tensorboard")


@dataclass
class Logger:
    """The run config's logger section: step-level training logs."""

    name: str = opt("none", choices=LOGGERS)  # none, or tensorboard (needs the tensorboard package: EXTRA)
    every: int = opt(10, low=1)  # steps per hand-over to the logger


class StepLogger:
    """Receives a fit's per-step scalars; `every` steps pass between calls of `steps` (the last call of
    a fit may be shorter). The base class records nothing (tests subclass it)."""

    def __init__(self, every: int = 10) -> None:
        check("logger", Logger, {"every": every})  # logger.every's rule, the line the config would give
        self.every = every

    def steps(self, first: int, losses: list[float], lrs: list[float], samples_per_second: float) -> None:
        """Steps first .. first + len(losses) - 1: their losses and learning rates, and the samples per
        second trained over them (global minibatch rows over wall-clock seconds)."""

    def close(self) -> None:
        """Flush and release whatever the logger holds."""


class TensorBoardLogger(StepLogger):
    """Scalars train/loss and train/lr at every step and train/samples_per_second at the last step of
    each interval, in one SummaryWriter folder."""

    def __init__(self, folder: Path, every: int = 10) -> None:
        super().__init__(every)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def steps(self, first: int, losses: list[float], lrs: list[float], samples_per_second: float) -> None:
        for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True)):
            self.writer.add_scalar("train/loss", loss, first + i)
            self.writer.add_scalar("train/lr", lr, first + i)
        self.writer.add_scalar("train/samples_per_second", samples_per_second, first + len(losses) - 1)

    def close(self) -> None:
        self.writer.close()


_ACTIVE: contextvars.ContextVar[StepLogger | None] = contextvars.ContextVar("step_logger", default=None)


def active() -> StepLogger | None:
    """The logger the running fit reports to (None: no logging)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def logging_to(logger: StepLogger | None) -> Iterator[StepLogger | None]:
    """Make `logger` the active one inside the block, and close it at the end."""
    token = _ACTIVE.set(logger)
    try:
        yield logger
    finally:
        _ACTIVE.reset(token)
        if logger is not None:
            logger.close()


def available() -> bool:
    """Whether the tensorboard package (torch.utils.tensorboard's writer backend) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def for_generations(name: str, folder: Path, every: int = 10) -> Any:
    """A factory t -> logger for the generation loop: TensorBoard writers in folder/gen_XXX, or None."""
    if name == "none":
        return None
    return lambda t: TensorBoardLogger(folder / f"gen_{t:03d}", every)
