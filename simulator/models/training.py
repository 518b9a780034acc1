"""One training skeleton for the torch families (flow, glow, diffusion) and the downstream classifiers.

A family describes its loss as an `Objective`: an nn.Module whose `draw` makes one global minibatch's
random draws (row indices, noise, timesteps, ...; leading dimension = batch size) from the fit's generator
and whose `forward` returns the mean loss of some of those rows. `train` owns the rest: the optimizer
(adam, adamw or sgd with weight decay), learning-rate warm-up and schedule, gradient clipping, autocast
(bf16, or fp16 with a GradScaler), the EMA of the weights, the NaN/inf check, the progress bar,
channels_last and torch.compile, data parallelism and resumable fits.

Reproducibility. On the CPU every draw comes from the fit's generator in the family's order, so a fit is
the same function of (weights, data, seed) it always was. On CUDA the draws come from a device generator
seeded once from the fit's generator: no per-step host copies. The finiteness check keeps a device flag and
looks at it every `check_every` steps (1 on the CPU: raises before the bad update, as before; 50 on CUDA,
so there is no host sync per step), at the last step and before every checkpoint.

Data parallelism. Under torch.distributed (simulator.distributed.active()) every rank draws the same global
minibatch, keeps its rows (rank r of W takes rows r*B/W .. (r+1)*B/W; B must be divisible by W) and runs
the objective through DistributedDataParallel, which averages the gradients: the step is the one-process
step on the whole batch, up to float rounding. Data-dependent initialisation (ActNorm) runs once on the
whole first batch before DDP wraps the objective, as the single process does.

Resumable fits (FitCheckpoint). Every `every_steps` steps or `every_seconds` seconds the fit writes the
objective's weights, optimizer, EMA, grad scaler, step, generator states, minibatch sampler and the losses
so far to the checkpoint path (tmp file + os.replace, its checksum recorded: simulator.scratch); a fit that
finds the file matching its checksum resumes from it and ends bit for bit where the uninterrupted fit would
(CPU); one that fails it is set aside with one warning line and the fit starts from its first step.

Step logs. While a simulator.step_log logger is active (`logger=tensorboard`), rank 0 hands it every step's
loss and learning rate and the samples per second, once every `every` steps; it only reads the losses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from simulator import distributed, scratch, step_log
from simulator.models.base import OPTIONS_PREFIX, Batched, Diverged, FitCheckpoint, ResumableFit, refuse
from simulator.options import check as check_schema
from simulator.options import opt

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_CHECK_EVERY = 50  # steps between finiteness checks on CUDA (each is one host sync)


@dataclass
class TrainOptions:
    """How a family trains; a schema of simulator.options (the bounds of options.BOUNDS for the names the
    families share), checked by `check` with the one-line error naming the field."""

    optimizer: str = opt("adam", choices=OPTIMIZERS)  # "adam", "adamw" or "sgd" (momentum 0.9, Nesterov)
    lr: float = opt(1e-3, low=0)
    weight_decay: float = opt(0.0, low=0)
    warmup: int = opt(0, low=0)  # linear learning-rate warm-up steps at the start of every fit
    schedule: str = opt("constant", choices=SCHEDULES)  # "constant", or "cosine" decay to 0 over the fit
    grad_clip: float | None = opt(None, low=0)  # max gradient norm; None or 0: no clipping
    amp: str = opt("none", choices=tuple(AMP))  # "bf16" (CPU or CUDA) or "fp16" (CUDA, GradScaler) autocast
    check_every: int | None = opt(None, low=1)  # steps between finiteness checks; None: 1 CPU, 50 CUDA
    channels_last: bool = False  # convolution weights and image batches in channels_last memory format
    compile: bool = False  # torch.compile the objective

    def check(self, device: torch.device, prefix: str = OPTIONS_PREFIX) -> None:
        """Raise ConfigError (a ValueError) naming the first bad field, as prefix.<field>."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        check_schema(prefix, TrainOptions, values)
        if self.amp == "fp16" and device.type != "cuda":  # what the schema cannot say: the machine's part
            raise refuse(f"{prefix}.amp", f"none or bf16 on {device.type} (fp16 needs CUDA)", self.amp)

    def factor(self, step: int, steps: int) -> float:
        """Learning-rate multiplier at step (0-based) of a `steps`-step fit: warm-up times schedule."""
        f = min(1.0, (step + 1) / max(self.warmup, 1))
        if self.schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        return f


class EpochBatches:
    """Minibatch indices: successive random permutations (epochs) of n rows, min(size, n) at a time.

    A permutation is drawn when the previous one runs out (the first on the first call), from the
    generator passed to `next`; `state_dict` holds the current permutation and position (resumable).

    With row weights (n,) (a weighted fit, `weights` of the family's fit, validated by
    simulator.models.base.check_weights, so never all equal), every minibatch is min(size, n) rows drawn
    i.i.d. with probability w_i / sum w (with replacement). The minibatch's mean loss is then an unbiased
    estimate of the weighted loss sum_i w_i l_i / sum w, at every step. Weighted sampling is chosen over
    a weighted mean of per-example losses because (1) every objective keeps returning a plain mean loss
    (normflows' forward_kld and the classifiers' cross-entropy do not expose per-example losses),
    (2) the step's scale does not depend on the weights in the batch (a weighted mean over a small batch
    with a few heavy rows has a noisy denominator, or an unbiased but wildly scaled numerator), and
    (3) rows of weight zero cost nothing. Integer weights then give, in distribution, the minibatches of
    the data with each row repeated w_i times drawn with replacement. Unweighted fits (weights None) keep
    the epochs, bit for bit. No state beyond the generator: a resumed fit draws what it would have drawn.
    """

    def __init__(self, n: int, size: int, weights: torch.Tensor | None = None) -> None:
        self.n, self.size = n, min(size, n)
        self.perm: torch.Tensor | None = None
        self.pos = 0
        if weights is not None and tuple(weights.shape) != (n,):
            raise ValueError(f"weights: expected shape ({n},), got {tuple(weights.shape)}")
        self.weights = weights

    def next(self, generator: torch.Generator) -> torch.Tensor:
        if self.weights is not None:
            if self.weights.device != generator.device:
                self.weights = self.weights.to(generator.device)
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        if self.perm is None or self.pos + self.size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=generator, device=generator.device), 0
        self.pos += self.size
        return self.perm[self.pos - self.size : self.pos]

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


class Objective(nn.Module):
    """A family's training loss; DDP wraps this module, so its forward is what runs on every rank.

    `net` is the module being trained (its parameters are the optimizer's, in order); subclasses keep the
    data as plain attributes and a `batches` EpochBatches, and implement `draw` and `forward`.
    """

    batches: EpochBatches

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.channels_last = False

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The global minibatch's random draws, each with the batch size as its leading dimension."""
        raise NotImplementedError

    # forward(*batch) -> the mean loss over the rows of `batch` (a slice of `draw`'s tensors); each
    # objective names its own tensors, so it is left to nn.Module (whose default raises)

    def initialize(self, *batch: torch.Tensor) -> None:
        """Data-dependent initialisation on the whole global batch before DDP (default: nothing)."""

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the memory format the network runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


class EMA(EMAModel):
    """diffusers' EMAModel with the decay schedule the project has always used, updated in place.

    The shadow parameters alias the parameters of `target` (a copy of the trained module that sampling
    uses), so the module is the average. Decay at update k (0-based) is min(decay, (1 + k) / (10 + k)).
    EMAModel's own schedule (update_after_step=0) is the same except at the first update, which copies
    the weights (decay 0) where ours keeps 0.1 of the start; so `get_decay` is overridden, and `step` is
    one fused lerp as before (EMAModel subtracts): both keep earlier CPU results bit for bit.
    """

    def __init__(self, target: nn.Module, decay: float) -> None:
        super().__init__(target.parameters(), decay=decay, foreach=True)
        self.shadow_params = [p.detach() for p in target.parameters()]  # aliases: the module is the EMA

    def get_decay(self, optimization_step: int) -> float:
        k = optimization_step - 1
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def step(self, parameters: Any) -> None:
        self.optimization_step += 1
        self.cur_decay_value = d = self.get_decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, list(parameters), 1 - d)

    @torch.no_grad()
    def restart(self, parameters: Any) -> None:
        """Start the average afresh from `parameters` (train.ema=restart at a new generation)."""
        torch._foreach_copy_(self.shadow_params, list(parameters))
        self.optimization_step = 0

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        shadow = state.pop("shadow_params", None)
        super().load_state_dict(state)
        if shadow is not None:  # copy into the aliased tensors rather than replacing them
            with torch.no_grad():
                torch._foreach_copy_(
                    self.shadow_params,
                    [s.to(p.device) for s, p in zip(shadow, self.shadow_params, strict=True)],
                )


@dataclass
class FitResult:
    """What a fit leaves behind: per-step losses (global means, float32 on the CPU) and the optimizer."""

    losses: torch.Tensor
    optimizer_state: dict[str, Any]
    seconds: float
    resumed_from: int = 0  # the step the fit resumed from (0: started afresh)

    def mean_first_last(self, k: int = 10) -> tuple[float, float]:
        """Means of the first and last min(k, steps) losses (nan for an empty fit)."""
        k = min(k, len(self.losses))
        if not k:
            return math.nan, math.nan
        return float(self.losses[:k].mean()), float(self.losses[-k:].mean())


class TrainedFamily(ResumableFit, Batched):
    """The fit skeleton of the torch families (flow, glow, diffusion): resumable, carrying an optimizer.

    fit(...) validates nothing itself: a family's `objective` hook checks the data and builds the Objective,
    the TrainOptions and the EMA to update (or None); `train` runs the steps; the family's `fit_stats`
    turns the FitResult into the results row's training stats. The optimizer state of the last fit is kept
    in `optimizer_state` (train.carry_optimizer hands it to the next generation's fit). Capabilities:
    ResumableFit (fit(..., checkpoint=FitCheckpoint) resumes an interrupted fit) and Batched.
    """

    fit_desc = "fit"  # the progress bar's label
    steps: int  # the family's default optimizer steps per fit
    batch_size: int
    device: torch.device
    optimizer_state: dict[str, Any] | None

    def objective(
        self, data: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None,
        warmup: int | None, ema: str,
    ) -> tuple[Objective, TrainOptions, EMA | None]:  # fmt: skip
        """(objective, options, EMA) of one fit; warmup None: the family's own; ema "carry"/"restart"."""
        raise NotImplementedError

    def fit_stats(self, result: FitResult, steps: int) -> dict[str, Any]:
        """The row's training stats of a finished fit."""
        raise NotImplementedError

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
        weights: torch.Tensor | None = None,  # (1, n) or (n,) row weights: weighted minibatch sampling
    ) -> dict[str, Any]:
        """Train `steps` steps (None: the family's) on data (1, n, *event) through `train` (DDP under
        torch.distributed, resumable with a checkpoint). A warm start carries the weights over; the
        optimizer state only when passed as `optimizer_state` (the previous fit's is
        `self.optimizer_state`). What is trained and how: the family's `objective`."""
        objective, options, tracker = self.objective(data, labels, weights, warmup, ema)
        steps = self.steps if steps is None else int(steps)
        result = train(
            objective, steps=steps, generator=generator, options=options, device=self.device, ema=tracker,
            checkpoint=checkpoint, optimizer_state=optimizer_state, progress=progress, desc=self.fit_desc,
        )  # fmt: skip
        self.optimizer_state = result.optimizer_state
        return self.fit_stats(result, steps)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator minibatch draws come from: `generator` itself on its own device type (the CPU path,
    unchanged), else a generator on `device` seeded once from it (no per-step host copies)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def make_optimizer(options: TrainOptions, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(
        params, lr=options.lr, momentum=0.9, nesterov=True, weight_decay=options.weight_decay
    )


def local_rows(size: int) -> slice:
    """This rank's rows of a global minibatch of `size` rows (the ranks split it evenly, in order)."""
    rank, world_size = distributed.world()
    if size % world_size:
        raise ValueError(f"batch_size {size} must be divisible by the number of processes ({world_size})")
    per = size // world_size
    return slice(rank * per, (rank + 1) * per)


def _save(path: Any, state: dict[str, Any]) -> None:
    """Write state atomically with its checksum (scratch.save, fsynced); rank 0 writes for all ranks."""
    if distributed.is_main():
        scratch.save(state, path)


def _resumable(checkpoint: FitCheckpoint) -> bool:
    """Whether the fit resumes from checkpoint.path: rank 0 checks the file against its checksum (one that
    fails, or has none, is set aside with one warning line) and tells the other ranks."""
    ok = None
    if distributed.is_main():
        ok = scratch.check(checkpoint.path, checkpoint.corrupt, "starting the fit from its first step")
    return bool(distributed.broadcast_object(ok))


def train(
    objective: Objective,
    *,
    steps: int,
    generator: torch.Generator,  # the fit's generator (its state is saved in checkpoints)
    options: TrainOptions,
    device: torch.device,
    ema: EMA | None = None,  # updated after every optimizer step
    checkpoint: FitCheckpoint | None = None,
    optimizer_state: dict[str, Any] | None = None,  # carried over from an earlier fit
    progress: bool = False,
    desc: str = "fit",
    on_step: Callable[[int], None] | None = None,  # called after every completed step (tests: kill here)
) -> FitResult:
    """Run `steps` optimizer steps of `objective` (resuming from `checkpoint` when its file exists)."""
    options.check(device)
    ddp_on = distributed.active()
    params = [p for p in objective.net.parameters() if p.requires_grad]
    opt = make_optimizer(options, params)
    if optimizer_state is not None:  # a copy: load_state_dict would alias the caller's tensors
        opt.load_state_dict(copy.deepcopy(optimizer_state))
    scaler = torch.amp.GradScaler(device.type, enabled=options.amp == "fp16")
    draws = device_generator(generator, device)
    losses = torch.zeros(steps, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    check_every = options.check_every or (1 if device.type == "cpu" else CUDA_CHECK_EVERY)
    start = 0
    if checkpoint is not None:
        checkpoint = dataclasses.replace(checkpoint, path=Path(checkpoint.path))
    if checkpoint is not None and _resumable(checkpoint):
        state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
        if int(state["steps"]) != steps:
            raise ValueError(
                f"{checkpoint.path} belongs to a fit of {int(state['steps'])} steps, not {steps}"
            )
        objective.load_state_dict(state["objective"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        if draws is not generator:
            draws.set_state(state["draws"])
        batches = state["batches"]
        if batches["perm"] is not None:
            batches["perm"] = batches["perm"].to(draws.device)
        objective.batches.load_state_dict(batches)
        start = int(state["step"])
        losses[:start] = state["losses"].to(device)
    if (
        ddp_on
        and int(distributed.all_sum(torch.tensor(start, device=device))) != start * distributed.world()[1]
    ):
        raise RuntimeError("the ranks found fit checkpoints of different steps; remove them and rerun")
    if options.channels_last:
        objective.channels_last = True
        objective.net.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device.type, dtype=AMP[options.amp]) if AMP[options.amp] else contextlib.nullcontext()
    )
    model: Any = None  # objective, DDP-wrapped and/or compiled on the first step
    last_save = time.monotonic()
    logger = step_log.active() if distributed.is_main() else None  # logger=tensorboard (reads only)
    log_first, log_clock = start, time.perf_counter()
    log_lrs: list[float] = []

    def save(step: int) -> None:
        nonlocal last_save
        _save(checkpoint.path, {
            "steps": steps, "step": step, "objective": objective.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "generator": generator.get_state(),
            "draws": draws.get_state() if draws is not generator else None,
            "batches": objective.batches.state_dict(), "losses": losses[:step].cpu(),
        })  # fmt: skip
        last_save = time.monotonic()

    clock = time.perf_counter()
    objective.train()
    try:
        for step in tqdm(range(start, steps), desc=desc, leave=False, disable=not progress,
                         initial=start, total=steps):  # fmt: skip
            batch = objective.draw(draws)
            rows_drawn = batch[0].shape[0]  # the global minibatch (throughput counts every rank's rows)
            if model is None:
                model = _wrap(objective, batch, options, device, ddp_on)
            if ddp_on:
                rows = local_rows(batch[0].shape[0])
                batch = tuple(b[rows] for b in batch)
            lr = options.lr * options.factor(step, steps)
            for group in opt.param_groups:
                group["lr"] = lr
            if logger is not None:
                log_lrs.append(lr)
            with autocast:
                loss = model(*batch)
            losses[step] = loss.detach()
            bad |= ~torch.isfinite(loss.detach())
            every = (
                checkpoint is not None and checkpoint.every_steps and (step + 1) % checkpoint.every_steps == 0
            )
            timed = checkpoint is not None and checkpoint.every_seconds is not None
            if (step + 1 - start) % check_every == 0 or step == steps - 1 or every:
                due = timed and time.monotonic() - last_save >= checkpoint.every_seconds
                flags = distributed.all_sum(
                    torch.stack([bad.float(), torch.tensor(float(due), device=device)])
                ).tolist()
                if flags[0]:
                    raise Diverged(f"non-finite loss at step {step}" if check_every == 1
                                   else f"non-finite loss at or before step {step}")  # fmt: skip
                save_now = every or flags[1] > 0
            else:
                save_now = False
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.step(objective.net.parameters())
            if save_now:
                save(step + 1)
            if logger is not None and ((step + 1 - start) % logger.every == 0 or step == steps - 1):
                logged = losses[log_first : step + 1].tolist()  # rank 0's rows under DDP
                seconds = max(time.perf_counter() - log_clock, 1e-9)
                logger.steps(log_first, logged, log_lrs, len(logged) * rows_drawn / seconds)
                log_first, log_lrs, log_clock = step + 1, [], time.perf_counter()
            if on_step is not None:
                on_step(step)
    finally:
        objective.eval()
    if ddp_on:  # each rank logged its rows' mean; the ranks' mean is the global batch's mean
        losses = distributed.all_sum(losses) / distributed.world()[1]
    if checkpoint is not None and distributed.is_main():
        scratch.forget(checkpoint.path)
    return FitResult(losses.float().cpu(), opt.state_dict(), time.perf_counter() - clock, start)


def _wrap(
    objective: Objective,
    batch: tuple[torch.Tensor, ...],
    options: TrainOptions,
    device: torch.device,
    ddp: bool,
) -> Any:
    """The callable the steps run: the objective, initialised on the global batch and DDP-wrapped under
    torch.distributed, and compiled when asked."""
    model: Any = objective
    if ddp:
        local_rows(batch[0].shape[0])  # the batch-size check, before any collective
        objective.initialize(*batch)
        objective.to(device)  # data-dependent init may leave new buffers on the CPU
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if options.compile:
        model = compiled(model, objective)
    return model


def compiled(model: nn.Module, objective: Objective) -> Any:
    """torch.compile of model (the objective, perhaps DDP-wrapped), compiled once per process.

    Dynamo keeps its graphs with the code of `forward`, not with the module object (torch >= 2.5 inlines
    nn.Modules: its guards check their tensors and attributes, not their identity), so a new objective of
    the same class (every fit builds one) reuses them while the guards hold. What changes from one
    generation to the next is the number of rows of the data the objective indexes (a growing pool,
    another policy), so those tensors' first dimension is marked dynamic: the first graph serves every
    generation instead of a recompile at the first new size, and later generations never meet dynamo's
    recompile limit (torch._dynamo.config.recompile_limit, 8) and fall back to eager.
    """
    for rows in data_tensors(objective):
        torch._dynamo.maybe_mark_dynamic(rows, 0)
    return torch.compile(model)


def data_tensors(objective: Objective) -> list[torch.Tensor]:
    """The objective's plain tensor attributes with one row per training row (data, labels, weights)."""
    n = objective.batches.n
    return [v for v in vars(objective).values() if isinstance(v, torch.Tensor) and v.dim() and len(v) == n]
