"""Normalizing-flow family for vectors: RealNVP or neural-spline flows built from normflows layers.

One chain per run (C = 1): replicates come from seeds (multirun), not from a chain dimension.
The flow maps base noise z ~ N(0, I) to data x (normflows' forward direction); the likelihood
runs the inverse direction. Exact log-likelihood, so `exact_likelihood = True`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import normflows as nf
import torch

from simulator.models.base import (
    Example,
    check_options,
    check_temperature,
    check_weights,
    flat_parameters,
    plain_state,
    refuse,
    seeded_build,
)
from simulator.models.training import (
    EMA,
    SCHEDULES,
    EpochBatches,
    FitResult,
    Objective,
    TrainedFamily,
    TrainOptions,
)

ARCHS = ("realnvp", "nsf")
LOG_SCALE_BOUND = 3.0  # |log scale| per RealNVP coupling; e^3 per layer is ample with ActNorm


class _FlowObjective(Objective):
    """Mean negative log-likelihood (nats per sample) of a minibatch of rows of x."""

    net: nf.NormalizingFlow

    def __init__(
        self, flow: nf.NormalizingFlow, x: torch.Tensor, batch_size: int, weights: torch.Tensor | None = None
    ) -> None:
        super().__init__(flow)
        self.x, self.batches = x, EpochBatches(len(x), batch_size, weights)

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (self.batches.next(generator).to(self.x.device),)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net.forward_kld(self.x[idx])

    @torch.no_grad()
    def initialize(self, idx: torch.Tensor) -> None:  # type: ignore[override]
        self.net.forward_kld(self.x[idx])  # ActNorm's first-batch initialisation sees the global batch


@contextlib.contextmanager
def frozen_actnorm(net: torch.nn.Module) -> Iterator[None]:
    """Evaluate net without side effects: an ActNorm not yet fitted would otherwise initialise itself from
    whatever batch it sees first (making results depend on their batch); until a fit it is the identity."""
    acts = [m for m in net.modules() if isinstance(m, nf.flows.ActNorm)]
    fresh = [(m, m.data_dep_init_done) for m in acts if not m.data_dep_init_done > 0]
    for m, flag in fresh:
        m.data_dep_init_done = torch.ones_like(flag)
    try:
        yield
    finally:
        for m, flag in fresh:
            m.data_dep_init_done = flag


class NormflowsFamily(TrainedFamily):
    """What FlowFamily and GlowFamily share: a normflows model in `self.flow`, built by `self._build()`."""

    flow: nf.NormalizingFlow
    device: torch.device

    def _build(self) -> nf.NormalizingFlow:
        raise NotImplementedError

    def reset(self, generator: torch.Generator) -> None:
        """Re-initialise every parameter (and ActNorm's first-batch flag) from scratch, deterministically
        from generator (layers initialise through the global CPU RNG: seeded_build)."""
        self.flow = seeded_build(generator, self._build)
        self.flow.to(self.device).eval()

    @property
    def dtype(self) -> torch.dtype:
        """The flow's floating dtype (float32 by default; tests may cast the flow to float64)."""
        return next(self.flow.parameters()).dtype

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors (weights, masks, LU buffers, ActNorm flags) that load with weights_only=True."""
        return plain_state(self.flow)

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        """Load weights saved by state_dict into this (same-architecture) flow; the ActNorm flags come
        along, so no re-initialisation."""
        out = self.flow.load_state_dict(state)
        # ActNorm reassigns its flag as a new CPU tensor on first use; keep every buffer on the device.
        self.flow.to(self.device)
        return out

    def parameters_vector(self) -> torch.Tensor:
        """All trainable parameters flattened to (1, P) on the CPU, for parameter distances."""
        return flat_parameters(self.flow)


class FlowFamily(NormflowsFamily):
    """A normflows NormalizingFlow behind the GenerativeModel protocol (vectors, one chain)."""

    exact_likelihood = True
    fit_desc = "flow fit"
    EXAMPLE = Example(chains=1, options={"blocks": 2, "hidden": 8, "batch_size": 16}, steps=6)
    # rules beyond the annotations and options.BOUNDS, for the config path and the constructor alike
    OPTIONS = {"arch": {"choices": ARCHS}, "schedule": {"choices": SCHEDULES}}

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],
        arch: str = "realnvp",  # "realnvp" (masked affine couplings) or "nsf" (rational-quadratic splines)
        blocks: int = 8,  # coupling layers
        hidden: int = 64,  # width of each conditioner network
        layers: int = 2,  # hidden layers (realnvp MLP) or residual blocks (nsf ResidualNet)
        bins: int = 8,  # spline bins (nsf)
        tail_bound: float = 5.0,  # splines act on [-B, B], identity outside (nsf)
        actnorm: bool = True,  # ActNorm after every block: data-dependent standardisation on first batch
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        steps: int = 1000,  # default optimiser steps per fit; fit(steps=...) overrides
        grad_clip: float | None = 10.0,  # max gradient norm; None disables clipping
        warmup: int = 0,  # linear learning-rate warm-up steps at the start of every fit
        schedule: str = "constant",  # learning rate within each fit: "constant" or "cosine" (decay to 0)
        compile: bool = False,  # torch.compile the training objective
        device: str = "cpu",
    ) -> None:
        check_options(FlowFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        if chains != 1:
            raise refuse("chains", "1 (model.family=flow runs one chain per run; use seeds (multirun) for "
                         "replicates)", chains)  # fmt: skip
        if len(event_shape) != 1:
            raise refuse("event_shape", "(d,): model.family=flow models vectors", tuple(event_shape))
        self.chains = 1
        self.event_shape = tuple(event_shape)
        self.dim = int(event_shape[0])
        self.arch, self.blocks, self.hidden, self.layers = arch, blocks, hidden, layers
        self.bins, self.tail_bound, self.actnorm = bins, tail_bound, actnorm
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.steps, self.grad_clip, self.warmup, self.compile = steps, grad_clip, warmup, compile
        self.schedule = schedule
        self.optimizer_state: dict[str, Any] | None = None  # the last fit's optimizer (carry_optimizer)
        self.device = torch.device(device)
        self.chunk = 4096  # rows per forward pass in sample/log_prob: bounds memory, not results
        # The constructor builds a deterministic network (seed 0) so a fresh object is reproducible.
        self.reset(torch.Generator().manual_seed(0))

    # -- construction -------------------------------------------------------------------------

    def _build(self) -> nf.NormalizingFlow:
        """The normflows container: base N(0, I) (fixed), then `blocks` couplings from z to x."""
        d = self.dim
        flows: list[nf.flows.Flow] = []
        # Alternating masks so every coordinate gets transformed. In 1-D a RealNVP coupling has nothing
        # to condition on and reduces to an affine map (a Gaussian model); nsf is the 1-D choice.
        mask = (torch.arange(d) % 2 == 0).float()
        for i in range(self.blocks):
            if self.arch == "realnvp":
                sizes = [d] + [self.hidden] * self.layers + [d]
                # Zero-initialised last layers: each coupling starts as the identity (normflows examples).
                # The log-scale is B tanh(out / B): unbounded ReLU nets extrapolate linearly, and exp of
                # that overflows to inf/NaN for points far from the data (held-out NLL, grids).
                s = nf.nets.MLP(
                    sizes,
                    init_zeros=True,
                    output_fn="tanh",
                    score_scale=1 / LOG_SCALE_BOUND,
                    output_scale=LOG_SCALE_BOUND,
                )
                t = nf.nets.MLP(sizes, init_zeros=True)
                flows.append(nf.flows.MaskedAffineFlow(mask if i % 2 == 0 else 1 - mask, t, s))
            elif d >= 2:
                flows.append(
                    nf.flows.CoupledRationalQuadraticSpline(
                        d,
                        self.layers,
                        self.hidden,
                        num_bins=self.bins,
                        tail_bound=self.tail_bound,
                        reverse_mask=i % 2 == 1,
                    )
                )
            else:
                # A coupling needs two coordinates; in 1-D the autoregressive spline is unconditional.
                flows.append(
                    nf.flows.AutoregressiveRationalQuadraticSpline(
                        d, self.layers, self.hidden, num_bins=self.bins, tail_bound=self.tail_bound
                    )
                )
            if self.actnorm:
                flows.append(nf.flows.ActNorm((d,)))
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)

    # -- training -----------------------------------------------------------------------------

    def objective(
        self, data: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None,
        warmup: int | None, ema: str,
    ) -> tuple[Objective, TrainOptions, EMA | None]:  # fmt: skip
        """Maximum likelihood on data (1, n, d) with Adam; labels are ignored (unconditional flow), and so
        is ema (no EMA in this family: nothing to carry)."""
        x = self._check_data(data)[0].to(self.device, self.dtype)
        w = check_weights(weights, 1, len(x))
        options = TrainOptions(
            optimizer="adam", lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            warmup=self.warmup if warmup is None else warmup, schedule=self.schedule, compile=self.compile,
        )  # fmt: skip
        return _FlowObjective(self.flow, x, self.batch_size, None if w is None else w[0]), options, None

    def fit_stats(self, result: FitResult, steps: int) -> dict[str, Any]:
        losses = result.losses
        return {
            "loss_first": float(losses[0]) if steps else math.nan,
            "loss_last": float(losses[-1]) if steps else math.nan,
            "steps": float(steps),
            "seconds": result.seconds,
        }

    # -- sampling and likelihood --------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw (1, n, d) samples; temperature s scales the base variance, z ~ N(0, s I).

        All noise is drawn first, then pushed through the flow in chunks; each sample depends only
        on its own noise, so the chunk size changes nothing beyond matmul roundoff. Labels are ignored.
        """
        temperature = check_temperature(temperature)
        z = torch.randn(n, self.dim, generator=generator, device=generator.device)
        z = (z * math.sqrt(temperature)).to(self.device, self.dtype)
        with frozen_actnorm(self.flow):
            x = [self.flow.forward(c) for c in z.split(self.chunk)] if n > 0 else [z]
        return torch.cat(x).unsqueeze(0)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (1, n) of x (1, n, d) or (n, d), in nats; on x's device."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        flat = self._check_data(x)[0].to(self.device, self.dtype)
        with frozen_actnorm(self.flow):
            lp = [self.flow.log_prob(c) for c in flat.split(self.chunk)] if len(flat) else [flat[:, 0]]
        return torch.cat(lp).unsqueeze(0).to(x.device)

    def _check_data(self, data: torch.Tensor) -> torch.Tensor:
        """Validate a (1, n, d) tensor; one clear error otherwise."""
        if data.dim() != 3 or data.shape[0] != 1 or tuple(data.shape[2:]) != self.event_shape:
            raise ValueError(f"flow expects (1, n, {self.dim}) data, got {tuple(data.shape)}")
        return data
