"""Glow-style multiscale normalizing flow for 8-bit images (normflows), trained on dequantized pixels.

One chain per run (C = 1). Images arrive as uint8 (1, n, ch, h, w). Training dequantizes them,
x = (u + v) / 256 with v ~ U[0, 1)^D, and maximises the continuous log-density of x on [0, 1]^D.
As p_cont integrates to one, P(u) = 256^-D E_v[p_cont((u + v) / 256)] >= exp(E_v[log p_cont] - D log 256)
(Jensen), so `log_prob` reports log p_cont((u + v) / 256) - D log 256: a one-draw estimate of that bound
on the discrete log-likelihood, and -log_prob / (D ln 2) is the usual bits/dim of 8-bit images.

Architecture (Kingma & Dhariwal 2018, as in normflows' Glow example): `levels` scales; each has
`blocks_per_level` GlowBlocks (ActNorm, invertible 1x1 convolution, affine coupling) and a Squeeze; between
scales half the channels are factored out to a learned diagonal Gaussian (per channel; per class and
dimension when `num_classes` is set). The flow maps latents z to data x (normflows' forward direction).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import normflows as nf
import torch

from simulator.models.base import (
    OPTIONS_PREFIX,
    Conditional,
    Example,
    IndexedSampling,
    check_options,
    check_temperature,
    check_weights,
    refuse,
)
from simulator.models.flow import NormflowsFamily, frozen_actnorm
from simulator.models.training import EMA, EpochBatches, FitResult, Objective, TrainOptions
from simulator.seeding import derive_seed

PREPROCESS = ("logit", "shift")  # logit(alpha + (1 - 2 alpha) x) as RealNVP, or x - 0.5 as Glow
DEQUANTIZATION = ("uniform",)
SPLIT_MODES = ("channel", "channel_inv", "checkerboard")
EVAL_NOISE_SEED = 256  # fixed dequantization field of log_prob: the same noise for every image


class _GlowObjective(Objective):
    """Mean negative continuous log-density (nats per image) of a dequantized minibatch."""

    def __init__(
        self, family: GlowFamily, u: torch.Tensor, y: torch.Tensor | None, weights: torch.Tensor | None = None
    ) -> None:
        super().__init__(family.flow)
        self.family, self.u, self.y = family, u, y
        self.batches = EpochBatches(len(u), family.batch_size, weights)

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = self.batches.next(generator).to(self.u.device)
        shape = self.family.event_shape
        return idx, torch.rand(len(idx), *shape, generator=generator, device=generator.device)

    def forward(self, idx: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = self.images(self.family.dequantize(self.u[idx], noise))
        return -self.family.continuous_log_prob(x, None if self.y is None else self.y[idx]).mean()

    @torch.no_grad()
    def initialize(self, idx: torch.Tensor, noise: torch.Tensor) -> None:  # type: ignore[override]
        self.forward(idx, noise)  # ActNorm's first-batch initialisation sees the global batch


class GlowFamily(NormflowsFamily, IndexedSampling, Conditional):
    """A normflows MultiscaleFlow behind the GenerativeModel protocol (uint8 images, one chain)."""

    exact_likelihood = True
    per_sample_seeds = True  # sample(n, ..., indices=...) gives rows `indices` of the n-sample draw
    fit_desc = "glow fit"
    EXAMPLE = Example(chains=1, event_shape=(1, 8, 8), rows=24, steps=6,
                      options={"levels": 1, "blocks_per_level": 2, "hidden": 8, "batch_size": 8})  # fmt: skip
    # rules beyond the annotations and options.BOUNDS, for the config path and the constructor alike
    OPTIONS = {
        "split_mode": {"choices": SPLIT_MODES},
        "preprocess": {"choices": PREPROCESS},
        "dequantization": {"choices": DEQUANTIZATION},
        "logit_alpha": {"low": 0, "strict": True, "high": 0.5, "strict_high": True},
    }

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],  # (ch, h, w)
        levels: int = 2,  # scales; h and w must be divisible by 2**levels
        blocks_per_level: int = 4,  # GlowBlocks per scale
        hidden: int = 64,  # channels of each coupling's conv net
        split_mode: str = "channel",  # how a coupling splits its input (normflows Split modes)
        scale: bool = True,  # affine (True) or additive (False) couplings
        num_classes: int | None = None,  # class-conditional base distribution
        preprocess: str = "logit",  # map [0, 1] data to the flow's input; its log-det is included
        logit_alpha: float = 0.05,
        dequantization: str = "uniform",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        steps: int = 1000,  # default optimiser steps per fit; fit(steps=...) overrides
        grad_clip: float | None = 100.0,  # max gradient norm; None disables clipping
        warmup: int = 0,  # linear learning-rate warm-up steps at the start of every fit
        compile: bool = False,  # torch.compile the training objective
        channels_last: bool = False,  # channels_last memory format for the conv nets in training
        device: str = "cpu",
    ) -> None:
        check_options(GlowFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        if chains != 1:
            raise refuse("chains", "1 (model.family=glow runs one chain per run; use seeds (multirun) for "
                         "replicates)", chains)  # fmt: skip
        if len(event_shape) != 3 or min(event_shape) < 1:
            raise refuse("event_shape", "(ch, h, w): model.family=glow models images", tuple(event_shape))
        if event_shape[1] % 2**levels or event_shape[2] % 2**levels:
            raise refuse(f"{OPTIONS_PREFIX}.levels", f"such that the image size {tuple(event_shape[1:])} is "
                         "divisible by 2**levels", levels)  # fmt: skip
        self.chains = 1
        self.event_shape = tuple(int(s) for s in event_shape)
        self.dim = math.prod(self.event_shape)  # D: pixels times channels
        self.levels, self.blocks_per_level, self.hidden = levels, blocks_per_level, hidden
        self.split_mode, self.scale, self.num_classes = split_mode, scale, num_classes
        self.preprocess, self.logit_alpha, self.dequantization = preprocess, logit_alpha, dequantization
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.steps, self.grad_clip = steps, grad_clip
        self.warmup, self.compile, self.channels_last = warmup, compile, channels_last
        self.optimizer_state: dict[str, Any] | None = None  # the last fit's optimizer (carry_optimizer)
        self.device = torch.device(device)
        self.chunk = 1024  # images per forward pass in sample/log_prob: bounds memory, not results
        g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        self.eval_noise = torch.rand(self.event_shape, generator=g)  # fixed, so log_prob is deterministic
        self.reset(torch.Generator().manual_seed(0))  # a fresh object is reproducible

    # -- construction -------------------------------------------------------------------------

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Shape of each level's latent, coarsest first (normflows' level order)."""
        c, h, w, L = *self.event_shape, self.levels
        shapes = [(c * 2 ** (L + 1), h // 2**L, w // 2**L)]
        shapes += [(c * 2 ** (L - i), h // 2 ** (L - i), w // 2 ** (L - i)) for i in range(1, L)]
        return shapes

    def _build(self) -> nf.MultiscaleFlow:
        """Bases, GlowBlocks, squeezes and merges, coarsest level first, as in normflows' Glow example."""
        c, L = self.event_shape[0], self.levels
        q0, flows, merges = [], [], []
        for i, shape in enumerate(self.latent_shapes()):
            width = c * 2 ** (L + 1 - i)  # channels the blocks of level i act on (after the merge)
            level: list[nf.flows.Flow] = [
                nf.flows.GlowBlock(width, self.hidden, scale=self.scale, split_mode=self.split_mode)
                for _ in range(self.blocks_per_level)
            ]
            flows.append([*level, nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
            if self.num_classes is None:
                q0.append(nf.distributions.GlowBase(shape))
            else:
                q0.append(nf.distributions.ClassCondDiagGaussian(shape, self.num_classes))
        transform = nf.transforms.Logit(self.logit_alpha) if self.preprocess == "logit" else None
        return nf.MultiscaleFlow(q0, flows, merges, transform, class_cond=self.num_classes is not None)

    # -- data ---------------------------------------------------------------------------------

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """Validate uint8 (1, n, ch, h, w) or (n, ch, h, w) images; return (n, ch, h, w)."""
        if x.dim() == 4:
            x = x.unsqueeze(0)
        if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[0] != 1 or x.shape[2:] != self.event_shape:
            shape = ", ".join(map(str, self.event_shape))
            raise ValueError(f"glow expects uint8 (1, n, {shape}) images, got {x.dtype} {tuple(x.shape)}")
        return x[0]

    def _labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Validate labels (1, n) or (n,) in [0, num_classes); None for an unconditional flow."""
        if labels is None or self.num_classes is None:
            return None
        y = labels.reshape(-1).to(self.device, torch.long)
        if len(y) != n or (len(y) and (y.min() < 0 or y.max() >= self.num_classes)):
            raise ValueError(f"glow expects {n} labels in [0, {self.num_classes}), got {tuple(labels.shape)}")
        return y

    def dequantize(self, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Pixels u in {0..255} plus noise in [0, 1), scaled to [0, 1): the continuous data."""
        return (u.to(self.device, self.dtype) + noise.to(self.device, self.dtype)) / 256

    def _flow_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] data to the flow's data space; a shift has unit Jacobian, the logit lives in the flow."""
        return x - 0.5 if self.preprocess == "shift" else x

    def continuous_log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density (n,) of continuous images x in [0, 1]^D (nats); the class marginal when y is None."""
        z, log_det = self.flow.inverse_and_log_det(self._flow_input(x))

        def base(y: torch.Tensor | None) -> torch.Tensor:  # log q(z | y), summed over the levels
            if self.num_classes is None:
                return sum(q.log_prob(zl) for q, zl in zip(self.flow.q0, z, strict=True))
            return sum(q.log_prob(zl, y) for q, zl in zip(self.flow.q0, z, strict=True))

        if self.num_classes is None or y is not None:
            return log_det + base(y)
        # p(x) = (1/K) sum_k p(x | k): uniform class prior, exact by logsumexp over the K base densities.
        classes = torch.arange(self.num_classes, device=x.device)
        per_class = torch.stack([base(k.expand(len(x))) for k in classes])
        return log_det + torch.logsumexp(per_class, 0) - math.log(self.num_classes)

    # -- training -----------------------------------------------------------------------------

    def objective(
        self, data: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None,
        warmup: int | None, ema: str,
    ) -> tuple[Objective, TrainOptions, EMA | None]:  # fmt: skip
        """Maximum likelihood on dequantized uint8 images (1, n, ch, h, w) with Adam (ema: nothing to carry).

        Labels train the class-conditional base; a conditional flow given no labels maximises the class
        marginal instead. A warm start carries the weights (and the fitted ActNorm); ActNorm initialises
        from the first batch after a reset only.
        """
        u = self._images(data).to(self.device)
        options = TrainOptions(
            optimizer="adam", lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            warmup=self.warmup if warmup is None else warmup, compile=self.compile,
            channels_last=self.channels_last,
        )  # fmt: skip
        w = check_weights(weights, 1, len(u))
        objective = _GlowObjective(self, u, self._labels(labels, len(u)), None if w is None else w[0])
        return objective, options, None

    def fit_stats(self, result: FitResult, steps: int) -> dict[str, Any]:
        bits = self.dim * math.log(2)  # nats per image -> bits per dimension
        first, last = (float(result.losses[0]), float(result.losses[-1])) if steps else (math.nan, math.nan)
        return {
            "loss_first": first,
            "loss_last": last,
            "bpd_first": first / bits + 8.0,  # + log2(256): the discrete 8-bit bits/dim
            "bpd_last": last / bits + 8.0,
            "steps": float(steps),
            "seconds": result.seconds,
        }

    # -- sampling and likelihood --------------------------------------------------------------

    def base_moments(self, level: int, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of level's Gaussian base, broadcastable to (n, *shape); mirrors normflows."""
        q = self.flow.q0[level]
        if self.num_classes is None:  # GlowBase: one mean and log-scale per channel
            loc = q.loc * torch.exp(q.loc_logs * q.logscale_factor)
            return loc, q.log_scale * torch.exp(q.log_scale_logs * q.logscale_factor)
        # ClassCondDiagGaussian: per-dimension parameters (*shape, K), picked by each sample's class
        return q.loc[..., y].movedim(-1, 0), q.log_scale[..., y].movedim(-1, 0)

    def _noise(self, rows: torch.Tensor, labels: torch.Tensor | None, n: int, generator: torch.Generator):
        """Per-sample draws for sample indices `rows` of n: sample i's latent noise (D values, all levels),
        then its class if unlabelled, from a generator seeded by derive_seed(generator.initial_seed(), i):
        independent of batching and of which other rows are drawn. `labels` are the n labels of all rows."""
        root = generator.initial_seed()
        eps = torch.empty(len(rows), self.dim)
        y = torch.empty(len(rows), dtype=torch.long) if self.num_classes is not None else None
        g = torch.Generator()
        for j, i in enumerate(rows.tolist()):
            g.manual_seed(derive_seed(root, i))
            eps[j] = torch.randn(self.dim, generator=g)
            if y is not None:
                y[j] = torch.randint(self.num_classes, (1,), generator=g)
        if labels is not None and y is not None:
            y = self._labels(labels, n).cpu()[rows]
        return eps, y

    def _rows(self, n: int, indices: Sequence[int] | None) -> torch.Tensor:
        """The sample indices to draw: all of 0..n-1, or `indices` (each in [0, n))."""
        if indices is None:
            return torch.arange(n)
        rows = torch.as_tensor(list(indices), dtype=torch.long).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"glow sample indices must lie in [0, {n}), got {rows.min()}..{rows.max()}")
        return rows

    def _decode_chunks(
        self, n: int, labels: torch.Tensor | None, generator: torch.Generator, temperature: float,
        indices: Sequence[int] | None,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        """Continuous samples in data space (about [0, 1]), `self.chunk` rows at a time: the noise of one
        chunk is drawn right before its forward pass, so memory does not grow with n."""
        temperature = check_temperature(temperature)
        sizes = [math.prod(s) for s in self.latent_shapes()]
        with torch.no_grad(), frozen_actnorm(self.flow):
            for rows in self._rows(n, indices).split(self.chunk):
                eps, y = self._noise(rows, labels, n, generator)
                e = eps.to(self.device, self.dtype).split(sizes, dim=1)
                yc = None if y is None else y.to(self.device)
                z = []
                for level, shape in enumerate(self.latent_shapes()):
                    loc, log_scale = self.base_moments(level, yc)
                    # temperature s scales the base covariance: std times sqrt(s)
                    z.append(loc + torch.exp(log_scale) * math.sqrt(temperature) * e[level].view(-1, *shape))
                x = self.flow.forward_and_log_det(z)[0]
                yield x + 0.5 if self.preprocess == "shift" else x

    def sample_continuous(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Continuous samples (n or len(indices), ch, h, w) in data space (about [0, 1]), unquantized."""
        out = list(self._decode_chunks(n, labels, generator, temperature, indices))
        return torch.cat(out) if out else torch.empty(0, *self.event_shape, device=self.device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Draw uint8 images (1, n, ch, h, w); labels (n,) fix the classes of a conditional flow.

        With `indices`, only those rows of the n-sample draw: (1, len(indices), ch, h, w), equal to
        sample(n, ...)[:, indices] (per-sample seeds). Each chunk is quantized as soon as it is decoded,
        so no float32 copy of all samples is ever held.
        """
        out = [
            # the bin of 1.0 would be 256
            torch.floor(torch.nan_to_num(x, nan=0.0).clamp(0, 1 - 1e-6) * 256).to(torch.uint8)
            for x in self._decode_chunks(n, labels, generator, temperature, indices)
        ]
        empty = torch.empty(0, *self.event_shape, dtype=torch.uint8, device=self.device)
        return (torch.cat(out) if out else empty).unsqueeze(0)

    @torch.no_grad()
    def log_prob(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Discrete log-likelihood (1, n) in nats of uint8 images: log p_cont((u + v)/256) - D log 256.

        v is a fixed noise field (the same for every image, so the value is deterministic), or, with a
        generator, fresh per-image noise (image i seeded from derive_seed(initial_seed, "dequant", i)).
        Either way the mean over images is an unbiased estimate of the dequantization bound. A conditional
        flow gives log p(x | label) with labels and the class marginal without.
        """
        u = self._images(x)
        y_all = self._labels(labels, len(u))
        if generator is None:
            noise = self.eval_noise.expand(len(u), *self.event_shape)
        else:
            root, g = generator.initial_seed(), torch.Generator()
            noise = torch.stack([
                torch.rand(self.event_shape, generator=g.manual_seed(derive_seed(root, "dequant", i)))
                for i in range(len(u))
            ]) if len(u) else torch.empty(0, *self.event_shape)  # fmt: skip
        out = []
        with frozen_actnorm(self.flow):
            for rows in torch.arange(len(u)).split(self.chunk):
                xc = self.dequantize(u[rows.to(u.device)], noise[rows])
                y = None if y_all is None else y_all[rows.to(y_all.device)]
                out.append(self.continuous_log_prob(xc, y) - self.dim * math.log(256))
        lp = torch.cat(out) if out else torch.empty(0, device=self.device)
        return lp.unsqueeze(0).to(x.device)
