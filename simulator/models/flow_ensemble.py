"""C independent RealNVP flows trained at once: the flow family with a real chain dimension.

Each chain is the `flow` family's RealNVP (simulator/models/flow.py): `blocks` masked affine couplings
with alternating masks (even coordinates kept in even blocks), scale and shift MLPs (ReLU,
zero-initialised last layer, log-scale B tanh(out / B)), ActNorm after every coupling with
data-dependent init on the first batch, base N(0, I), Adam with the gradient norm clipped,
minibatches from successive random permutations. Instead of normflows modules every weight is
stacked over chains, (blocks, C, 2, fan_in, fan_out) with 2 = the scale and shift nets, and every
layer is one batched matmul over (chain, net) pairs.

Compute skips only what cannot matter: a coupling's first layer reads only the kept coordinates
(the others are zero in normflows' masked input) and its last layer produces outputs only for
the transformed coordinates (normflows multiplies the rest by zero). The unused weights are kept,
so parameter counts and init match FlowFamily; their gradient is exactly zero in both.

Chains are independent by construction: each chain's loss is backpropagated on its own, Adam is
elementwise, clipping uses each chain's own gradient norm, and chain c draws its initial weights,
minibatches and sampling noise from a stream derived from (one draw of the caller's generator, c).
So chain c does not depend on how many chains run beside it (bit for bit on CPU, tested).

On CPU the chains are trained in groups, each with its own leaf tensors and its own forward and
backward pass, sized so that one activation (2 nets x chains, batch, hidden) has about
`GROUP_ELEMENTS` entries: peak activation memory is one group's whatever C is, and that size was
measured fastest (8 chains at hidden 64, 32 at hidden 16). Groups never change the result.

Speed: at hidden width 64 the batched step is bound by memory traffic over the activations (the
same bytes per chain as a separate run), so the gain over separate FlowFamily fits is the
per-operation overhead those fits pay: about 3-4x at the flow.yaml architecture, more for smaller
nets (benchmarks/ensemble_flows.py).

Divergence: one non-finite chain raises Diverged for the whole ensemble (the loop records a
generation as a whole, so a partly diverged ensemble has no row to go in).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm import tqdm

from simulator import seeding
from simulator.models.base import (
    Batched,
    Example,
    broadcast_chains,
    check_finite,
    check_options,
    check_temperature,
    check_weights,
    refuse,
)

LOG_SCALE_BOUND = 3.0  # the same cap as flow.py: |log scale| <= 3 per coupling
LOG_2PI = math.log(2 * math.pi)
GROUP_ELEMENTS = 2**18  # activation entries per training pass on CPU; CUDA runs all chains at once

Params = dict[str, torch.Tensor]


class FlowEnsembleFamily(Batched):
    """C independent RealNVP flows on vectors behind the GenerativeModel protocol (data (C, n, d))."""

    exact_likelihood = True
    OPTIONS = {"layers": {"low": 0}}  # 0 hidden layers: linear conditioners (beyond options.BOUNDS)
    EXAMPLE = Example(chains=2, options={"blocks": 2, "hidden": 8, "batch_size": 16}, steps=6)

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],
        blocks: int = 8,  # coupling layers
        hidden: int = 64,  # width of each conditioner network
        layers: int = 2,  # hidden layers of each conditioner MLP
        lr: float = 1e-3,
        batch_size: int = 256,
        steps: int = 1000,  # default optimiser steps per fit; fit(steps=...) overrides
        grad_clip: float | None = 10.0,  # max gradient norm of each chain; None disables clipping
        actnorm: bool = True,  # ActNorm after every coupling, initialised from the first batch
        device: str = "cpu",
    ) -> None:
        check_options(FlowEnsembleFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        if chains < 1:
            raise refuse("chains", "an integer >= 1", chains)
        if len(event_shape) != 1:
            raise refuse("event_shape", "(d,): model.family=flow_ensemble models vectors", tuple(event_shape))
        self.chains = int(chains)
        self.event_shape = tuple(event_shape)
        self.dim = int(event_shape[0])
        self.blocks, self.hidden, self.layers, self.actnorm = blocks, hidden, layers, actnorm
        self.lr, self.batch_size, self.steps, self.grad_clip = lr, batch_size, steps, grad_clip
        self.device = torch.device(device)
        self.sizes = [self.dim] + [hidden] * layers + [self.dim]  # one conditioner MLP, input to output
        group = max(1, GROUP_ELEMENTS // (2 * batch_size * max(self.sizes)))
        group = min(group, self.chains) if self.device.type == "cpu" else self.chains
        self.bounds = [(a, min(a + group, self.chains)) for a in range(0, self.chains, group)]
        self.chunk_elements = 2**22  # activation elements per pass in sample/log_prob: bounds memory only
        # The constructor builds deterministic weights (seed 0) so a fresh object is reproducible.
        self.reset(torch.Generator().manual_seed(0))

    # -- construction and state ---------------------------------------------------------------

    def _chain_generators(self, generator: torch.Generator, purpose: str) -> list[torch.Generator]:
        """One stream per chain from a single draw of generator: chain c's stream ignores C."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return [seeding.generator(seed, purpose, c, device=generator.device) for c in range(self.chains)]

    def reset(self, generator: torch.Generator) -> None:
        """Re-initialise every chain from scratch, deterministically from generator.

        nn.Linear's default init (uniform, bound 1/sqrt(fan_in), weights and biases), the last layer
        zero so each coupling starts as the identity; ActNorm starts at the identity, not yet fitted.
        """
        shapes = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        draws: list[list[torch.Tensor]] = []  # per chain: w0, b0, w1, b1, ... (last layer excluded)
        for g in self._chain_generators(generator, "init"):
            chain = []
            for a, b in shapes[:-1]:
                shape: tuple[int, ...]
                for shape in ((self.blocks, 2, a, b), (self.blocks, 2, 1, b)):
                    u = torch.rand(shape, generator=g, device=g.device)
                    chain.append(((2 * u - 1) / math.sqrt(a)).cpu())
            draws.append(chain)
        full: Params = {}
        for i, (a, b) in enumerate(shapes):
            for j, (name, shape) in enumerate(((f"w{i}", (a, b)), (f"b{i}", (1, b)))):
                if i < len(shapes) - 1:  # (blocks, C, 2, ...): chains on dim 1
                    full[name] = torch.stack([chain[2 * i + j] for chain in draws], 1)
                else:
                    full[name] = torch.zeros(self.blocks, self.chains, 2, *shape)
        if self.actnorm:
            full["an_s"] = torch.zeros(self.blocks, self.chains, 1, self.dim)
            full["an_t"] = torch.zeros(self.blocks, self.chains, 1, self.dim)
        self._set(full, torch.zeros(self.chains, dtype=torch.bool))

    def _set(self, full: Params, done: torch.Tensor) -> None:
        """Split full (blocks, C, ...) tensors into per-group leaf tensors on the device."""
        self.groups: list[Params] = [
            {k: v[:, a:b].to(self.device).clone().requires_grad_() for k, v in full.items()}
            for a, b in self.bounds
        ]
        self.actnorm_done = done.to(self.device, torch.bool).clone()

    def _full(self) -> Params:
        """The per-group leaves joined back into (blocks, C, ...) tensors (detached)."""
        return {k: torch.cat([p[k].detach() for p in self.groups], 1) for k in self.groups[0]}

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors (stacked weights, ActNorm flags) that load with weights_only=True."""
        state: dict[str, Any] = {k: v.cpu().clone() for k, v in self._full().items()}
        state["actnorm_done"] = self.actnorm_done.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load weights saved by state_dict into this (same chains, same architecture) ensemble."""
        full = self._full()
        if set(state) != set(full) | {"actnorm_done"}:
            raise ValueError(f"state keys {sorted(state)} do not match {sorted(full) + ['actnorm_done']}")
        for k, v in full.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"state {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        self._set({k: state[k].to(v.dtype) for k, v in full.items()}, state["actnorm_done"])

    def parameters_vector(self) -> torch.Tensor:
        """All trainable parameters flattened to (C, P) on the CPU, for parameter distances."""
        return torch.cat([v.movedim(1, 0).reshape(self.chains, -1) for v in self._full().values()], 1).cpu()

    def _cast(self, dtype: torch.dtype) -> None:
        """Cast the weights (tests use float64 to check invertibility at roundoff level)."""
        self._set({k: v.to(dtype) for k, v in self._full().items()}, self.actnorm_done)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (float32 unless a test casts them)."""
        return self.groups[0]["w0"].dtype

    # -- the flow (one group of chains) -------------------------------------------------------

    def _conditioner(
        self, layers: list[tuple], k: int, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-scale and shift (c, n, |transformed|) of coupling k from the kept half keep (c, n, |kept|)."""
        c, n, _ = keep.shape
        rows, cols = slice(k % 2, None, 2), slice(1 - k % 2, None, 2)  # kept inputs, transformed outputs
        h = keep.unsqueeze(1)  # (c, 1, n, kept): the scale and shift nets read the same input
        for i, (ws, bs) in enumerate(layers):
            w, b = ws[k], bs[k]  # (c, 2, fan_in, fan_out), (c, 2, 1, fan_out)
            if i == 0:
                w = w[:, :, rows]
            if i == len(layers) - 1:
                w, b = w[..., cols], b[..., cols]
            if i == 0:  # one kept coordinate (2-D data): an outer product, cheaper than a matmul
                h = torch.addcmul(b, h, w) if w.shape[-2] == 1 else torch.matmul(h, w).add_(b)
            else:
                # bmm then an in-place bias add: baddbmm would first copy the broadcast bias into
                # a fresh output, a full extra pass over the largest tensor
                h = torch.bmm(h.reshape(2 * c, n, h.shape[-1]), w.reshape(2 * c, *w.shape[-2:]))
                h = h.add_(b.reshape(2 * c, 1, -1))
            if i < len(layers) - 1:
                h = h.relu_()  # in place on a fresh product (not a view): its producer keeps no output
            h = h.view(c, 2, n, -1)
        s, t = h.unbind(1)
        return LOG_SCALE_BOUND * torch.tanh(s / LOG_SCALE_BOUND), t

    def _layers(self, p: Params) -> tuple[list[tuple], tuple, tuple]:
        """Per-block views of a group's leaves (unbind: its backward is one stack per tensor)."""
        layers = [(p[f"w{i}"].unbind(0), p[f"b{i}"].unbind(0)) for i in range(len(self.sizes) - 1)]
        if not self.actnorm:
            return layers, (), ()
        return layers, p["an_s"].unbind(0), p["an_t"].unbind(0)

    def _inverse(
        self, p: Params, x: torch.Tensor, fresh: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Data x (c, n, d) to base halves [even, odd] and log|det dz/dx| (c, n).

        fresh (c,) bool: ActNorms of these chains take their data-dependent init from this batch
        (normflows' ActNorm.inverse: standardise the layer's input per coordinate); no_grad only.
        """
        layers, an_s, an_t = self._layers(p)
        half = [x[..., 0::2], x[..., 1::2]]
        logdet = x.new_zeros(x.shape[:2])
        for k in reversed(range(self.blocks)):
            if self.actnorm:
                for j in (0, 1):
                    s, t = an_s[k][..., j::2], an_t[k][..., j::2]
                    if fresh is not None and half[j].numel():  # (1-D data: the odd half is empty)
                        std, mean = torch.std_mean(half[j], dim=1, keepdim=True)
                        f = fresh.view(-1, 1, 1)
                        s.copy_(torch.where(f, torch.log(std + 1e-6), s))
                        t.copy_(torch.where(f, mean, t))
                    half[j] = (half[j] - t) * torch.exp(-s)
                logdet = logdet - an_s[k].sum((1, 2)).unsqueeze(1)
            j = 1 - k % 2  # the half this coupling transforms
            s, t = self._conditioner(layers, k, half[k % 2])
            half[j] = (half[j] - t) * torch.exp(-s)
            logdet = logdet - s.sum(-1)
        return half, logdet

    def _forward(self, p: Params, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base z (c, n, d) to data x and log|det dx/dz| (c, n): the sampling direction."""
        layers, an_s, an_t = self._layers(p)
        half = [z[..., 0::2], z[..., 1::2]]
        logdet = z.new_zeros(z.shape[:2])
        for k in range(self.blocks):
            j = 1 - k % 2
            s, t = self._conditioner(layers, k, half[k % 2])
            half[j] = half[j] * torch.exp(s) + t
            logdet = logdet + s.sum(-1)
            if self.actnorm:
                for j in (0, 1):
                    half[j] = half[j] * torch.exp(an_s[k][..., j::2]) + an_t[k][..., j::2]
                logdet = logdet + an_s[k].sum((1, 2)).unsqueeze(1)
        x = torch.empty_like(z)
        x[..., 0::2], x[..., 1::2] = half
        return x, logdet

    def _log_prob(self, p: Params, x: torch.Tensor) -> torch.Tensor:
        """log q(x) (c, n) with gradients: base log-density of the inverse image plus the log-det."""
        (even, odd), logdet = self._inverse(p, x)
        sq = even.square().sum(-1) + odd.square().sum(-1)
        return logdet - 0.5 * sq - 0.5 * self.dim * LOG_2PI

    # -- training -----------------------------------------------------------------------------

    def _clip(self) -> None:
        """Scale each chain's gradient to norm <= grad_clip (torch's clip_grad_norm_ rule, per chain)."""
        for p in self.groups:
            norms = [
                torch.linalg.vector_norm(v.grad, dim=[i for i in range(v.dim()) if i != 1])
                for v in p.values()
            ]
            total = torch.linalg.vector_norm(torch.stack(norms), dim=0)  # (c,): each chain's whole gradient
            coef = (self.grad_clip / (total + 1e-6)).clamp(max=1.0)
            for v in p.values():
                v.grad.mul_(coef.view(1, -1, *[1] * (v.dim() - 2)))

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
        """Maximum likelihood on data (C or 1, n, d), all chains at once; labels are ignored.

        As in flow.py, every call builds a fresh Adam (a warm start carries only the weights) and
        draws minibatches from successive random permutations; here one permutation per chain.
        With row weights (C, n) or (n,), chain c draws its minibatch rows i.i.d. with probability
        w_ci / sum_i w_ci from its own stream instead (weighted sampling, as EpochBatches in training.py).
        """
        x = self._check(broadcast_chains(data, self.chains, 1)).to(self.device, self.dtype)
        steps = self.steps if steps is None else int(steps)
        n = x.shape[1]
        w = check_weights(weights, self.chains, n)
        size = min(self.batch_size, n)
        gens = self._chain_generators(generator, "fit")
        leaves = [v for p in self.groups for v in p.values()]
        fused = self.device.type in ("cpu", "cuda")  # one kernel over all leaves, the same update
        opt = torch.optim.Adam(leaves, lr=self.lr, fused=fused)
        rows = torch.arange(self.chains, device=self.device).unsqueeze(1)
        perm, pos = None, n
        first = last = torch.full((self.chains,), math.nan)
        start = time.perf_counter()
        for step in tqdm(range(steps), desc="flow ensemble fit", leave=False, disable=not progress):
            if w is not None:  # weighted: each chain's rows i.i.d. by weight, from its own stream
                idx = [torch.multinomial(w[c].to(g.device), size, replacement=True, generator=g)
                       for c, g in enumerate(gens)]  # fmt: skip
                perm, pos = torch.stack(idx).to(self.device), 0
            elif pos + size > n:  # all chains start a new epoch together (same n, same batch size)
                perm = torch.stack([torch.randperm(n, generator=g, device=g.device) for g in gens])
                perm, pos = perm.to(self.device), 0
            batch = x[rows, perm[:, pos : pos + size]]
            pos += size
            opt.zero_grad(set_to_none=True)
            losses = []
            for p, (a, b) in zip(self.groups, self.bounds, strict=True):
                if self.actnorm and not bool(self.actnorm_done[a:b].all()):
                    with torch.no_grad():  # data-dependent init on this first batch, then train on it
                        self._inverse(p, batch[a:b], fresh=~self.actnorm_done[a:b])
                    self.actnorm_done[a:b] = True
                loss = -self._log_prob(p, batch[a:b]).mean(1)  # (c,) nats per sample
                loss.sum().backward()  # the sum hands every chain the gradient of its own loss
                losses.append(loss.detach())
            loss = torch.cat(losses)
            check_finite(loss, step)  # before the update: a diverged step changes nothing
            if self.grad_clip is not None:
                self._clip()
            opt.step()
            if step == 0:
                first = loss.cpu()
            if step == steps - 1:
                last = loss.cpu()
        return {
            "loss_first": float(first.mean()),
            "loss_last": float(last.mean()),
            "loss_last_chains": [float(v) for v in last],
            "steps": float(steps),
            "seconds": time.perf_counter() - start,
        }

    # -- sampling and likelihood --------------------------------------------------------------

    def _rows(self, chains: int) -> int:
        """Rows per pass so that the widest activation (2c, rows, width) stays under chunk_elements."""
        return max(1, self.chunk_elements // (2 * chains * max(self.sizes)))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw (C, n, d) samples; temperature s scales the base variance, z ~ N(0, s I).

        Chain c's noise comes from its own stream, all drawn before the flow runs; each sample
        depends only on its own noise, so the pass sizes change nothing. Labels are ignored.
        """
        temperature = check_temperature(temperature)
        gens = self._chain_generators(generator, "sample")
        z = torch.stack([torch.randn(n, self.dim, generator=g, device=g.device) for g in gens])
        z = (z * math.sqrt(temperature)).to(self.device, self.dtype)
        out = []
        for p, (a, b) in zip(self.groups, self.bounds, strict=True):
            parts = [self._forward(p, c)[0] for c in z[a:b].split(self._rows(b - a), 1)] if n else [z[a:b]]
            out.append(torch.cat(parts, 1))
        return torch.cat(out)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (C, n) of x (C or 1, n, d) or (n, d), in nats; on x's device."""
        flat = self._check(broadcast_chains(x, self.chains, 1)).to(self.device, self.dtype)
        if flat.shape[1] == 0:
            return flat.new_zeros(self.chains, 0).to(x.device)
        out = []
        for p, (a, b) in zip(self.groups, self.bounds, strict=True):
            out.append(torch.cat([self._log_prob(p, c) for c in flat[a:b].split(self._rows(b - a), 1)], 1))
        return torch.cat(out).to(x.device)

    def _check(self, data: torch.Tensor) -> torch.Tensor:
        """Validate a (C, n, d) tensor; one clear error otherwise."""
        if tuple(data.shape[2:]) != self.event_shape:
            raise ValueError(f"flow_ensemble expects (C, n, {self.dim}) data, got {tuple(data.shape)}")
        return data
