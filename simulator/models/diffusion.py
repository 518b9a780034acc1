"""Image diffusion family: a diffusers UNet2DModel trained as a DDPM (Ho et al. 2020), sampled with DDIM.

One chain per run (C = 1). Images enter and leave as uint8 (1, n, ch, h, w) and are scaled to [-1, 1].
The network predicts the noise (epsilon) added by DDPMScheduler.add_noise. An exponential moving
average (EMA) of the weights is what `sample` and `log_prob` use. `log_prob` is the negative
variational bound of Ho et al. (L_T + sum_t L_{t-1} + L_0, discretized Gaussian decoder for 8-bit
data), a lower bound on log p(x), so `exact_likelihood = False`. The bound is that of the full T-step
ancestral reverse process with sigma_t^2 = beta_t; samples come from the strided DDIM/DDPM chain
(timesteps and noise: diffusion_sampler). `pretrained` starts from a diffusers directory (its UNet and
schedule; see diffusers_io), and `export` writes a generation as a DDIMPipeline directory whose scheduler
and sampling.json hold the run's sampler.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from simulator.models import diffusers_io, diffusion_sampler
from simulator.models import diffusion_bound as bound
from simulator.models.base import (
    OPTIONS_PREFIX,
    Conditional,
    Example,
    Exportable,
    IndexedSampling,
    check_options,
    check_weights,
    flat_parameters,
    plain_state,
    refuse,
    seeded_build,
)
from simulator.models.training import EMA, EpochBatches, FitResult, Objective, TrainedFamily, TrainOptions
from simulator.options import choose

SAMPLERS = ("ddpm", "ddim")
SPACINGS, NOISE = diffusion_sampler.SPACINGS, diffusion_sampler.NOISE
SCHEDULES = ("linear", "squaredcos_cap_v2")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LIKELIHOOD_SEED = 20200619  # root of the bound's noise, which is seeded by image content (see bound_terms)
CPU_ROWS = 64  # rows per network call on the CPU in sample/log_prob, padded: see _eps
BOUND_BYTES = 2**27  # noise held per log_prob chunk (rows x (K+1) x D floats); bounds memory, not results


class _DiffusionObjective(Objective):
    """Ho et al.'s L_simple on a minibatch: mean squared error of the predicted noise."""

    def __init__(
        self,
        family: DiffusionFamily,
        x8: torch.Tensor,
        y: torch.Tensor | None,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(family.unet)
        self.family, self.x8, self.y = family, x8, y
        self.batches = EpochBatches(len(x8), family.batch_size, weights)

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        f, g, size = self.family, generator, self.batches.size
        idx = self.batches.next(g).to(f.device)
        t = torch.randint(0, f.train_timesteps, (size,), generator=g, device=g.device)
        noise = torch.randn(size, *f.event_shape, generator=g, device=g.device).to(f.device)
        if self.y is None or f.null_class is None:
            return idx, t, noise  # no extra draw: without label dropout the stream is what it always was
        return idx, t, noise, torch.rand(size, generator=g, device=g.device) < f.label_dropout

    def forward(
        self, idx: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        f, t = self.family, t.to(self.family.device)
        xt = self.images(f.noise_scheduler.add_noise(self.x8[idx].float() / 127.5 - 1, noise, t))
        y = None if self.y is None else self.y[idx]
        if drop is not None:  # label dropout: these rows train the unconditional branch eps(x, null)
            y = torch.where(drop.to(y.device), f.null_class, y)
        return torch.nn.functional.mse_loss(f._eps(self.net, xt, t, y, pad=False), noise)


class DiffusionFamily(TrainedFamily, IndexedSampling, Conditional, Exportable):
    """A diffusers UNet2DModel behind the GenerativeModel protocol (uint8 images, one chain)."""

    exact_likelihood = False
    per_sample_seeds = True  # sample(n, ..., indices=...) gives rows of sample(n): the loop shards it
    fit_desc = "diffusion fit"
    EXAMPLE = Example(chains=1, event_shape=(1, 8, 8), rows=24, steps=6,
                      options={"block_out_channels": [4, 8], "batch_size": 8, "ema_decay": 0.9, "warmup": 3,
                               "sample_steps": 2, "likelihood_timesteps": 2})  # fmt: skip
    # rules beyond the annotations and options.BOUNDS, for the config path and the constructor alike
    OPTIONS = {"block_out_channels": {"low": 1},
               "train_timesteps": {"low": 2, "high": diffusers_io.MAX_TIMESTEPS},  # schedulers loop over each
               "lr": {"low": 0, "strict": True}, "beta_schedule": {"choices": SCHEDULES},
               "prediction_type": {"choices": ("epsilon",)}, "sampler": {"choices": SAMPLERS},
               "timestep_spacing": {"choices": SPACINGS}, "sample_noise": {"choices": NOISE},
               "amp": {"choices": tuple(AMP)}}  # fmt: skip

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],  # (ch, h, w)
        block_out_channels: tuple[int, ...] | list[int] = (32, 64),  # UNet widths, one per resolution
        layers_per_block: int = 1,
        attention: bool = False,  # self-attention at the lowest resolution and in the middle block
        num_classes: int | None = None,  # class-conditional through a label embedding added to time's
        label_dropout: float | None = None,  # P(label -> null class) in training: trains eps(x, null)
        train_timesteps: int = 1000,  # T of the forward process
        beta_schedule: str = "linear",  # "linear" (Ho et al.) or "squaredcos_cap_v2" (Nichol & Dhariwal)
        prediction_type: str = "epsilon",
        sampler: str = "ddim",  # "ddim" (eta below) or "ddpm" (ancestral: DDIM update with eta = 1)
        sample_steps: int = 50,  # reverse steps S (trailing: must divide train_timesteps)
        timestep_spacing: str | None = None,  # trailing (null): S evenly strided from T-1; quadratic: DDIM's
        sample_noise: str | None = None,  # per_sample | counter; null: per_sample on the CPU, else counter
        eta: float = 0.0,  # DDIM stochasticity: 0 deterministic, 1 ancestral
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        steps: int = 1000,  # default optimiser steps per fit; fit(steps=...) overrides
        ema_decay: float | None = 0.999,  # None or 0 disables the EMA (then the raw weights are used)
        grad_clip: float | None = 1.0,  # max gradient norm; None or 0 disables clipping
        warmup: int = 0,  # linear learning-rate warm-up steps at the start of every fit
        amp: str = "none",  # "bf16" or "fp16" autocast (fp16 needs CUDA); sampling too, not log_prob
        compile: bool = False,  # torch.compile the training objective and the sampling network
        channels_last: bool = False,  # channels_last memory format for the UNet in training
        device: str = "cpu",
        likelihood_timesteps: int = 100,  # K timesteps per image in the bound (stratified; see log_prob)
        sample_batch: int = 256,  # rows per network call in sample/log_prob: bounds memory, not results
        pretrained: str | None = None,  # a diffusers directory: its UNet and schedule replace the options
        export_pipeline: bool | None = False,  # export(dir) writes dir/pipeline/ when true (null: off)
    ) -> None:
        check_options(DiffusionFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        ch, h, w = (int(s) for s in event_shape) if len(event_shape) == 3 else (0, 0, 0)
        schedule: dict[str, Any] = {"num_train_timesteps": train_timesteps, "beta_schedule": beta_schedule}
        self.pretrained = None if pretrained is None else diffusers_io.read(pretrained)
        if self.pretrained is not None:  # the directory decides the architecture and the noise schedule
            arch, read = diffusers_io.family_options(self.pretrained, (ch, h, w))
            block_out_channels, layers_per_block, attention, num_classes = arch
            schedule = read or schedule
            train_timesteps = int(schedule.get("num_train_timesteps", 1000))
            beta_schedule = str(schedule.get("beta_schedule", "linear"))
            prediction_type = str(schedule.get("prediction_type", "epsilon"))
        ch_list = tuple(int(c) for c in block_out_channels)
        spacing = timestep_spacing or "trailing"
        p_drop = float(label_dropout or 0)
        scale = 2 ** max(len(ch_list) - 1, 0)
        P = OPTIONS_PREFIX
        rules = [  # (bad, field, must be, got): what one option needs of another, the data or the machine
            (chains != 1, "chains", "1 (model.family=diffusion runs one chain; use seeds for replicates)",
             chains),
            (len(event_shape) != 3, "event_shape", "(ch, h, w): model.family=diffusion models images",
             tuple(event_shape)),
            (not ch_list or h % scale or w % scale, f"{P}.block_out_channels",
             f"a non-empty list of L widths with the image size divisible by 2**(L-1), images {h}x{w}",
             list(ch_list)),
            (p_drop > 0 and num_classes is None, f"{P}.label_dropout",
             "0 or null unless the model is class-conditional (num_classes set)", label_dropout),
            (p_drop > 0 and self.pretrained is not None, f"{P}.label_dropout",
             "0 or null with init.pretrained (its UNet has no null class embedding; train generation 0 "
             "with init.pretrained=null)", label_dropout),
            (prediction_type != "epsilon", "init.pretrained",
             "a diffusers directory whose scheduler predicts epsilon (its prediction_type)", prediction_type),
            (train_timesteps < 2, "init.pretrained",
             "a diffusers directory with >= 2 timesteps (its num_train_timesteps)", train_timesteps),
            (spacing == "trailing" and train_timesteps % sample_steps, f"{P}.sample_steps",
             f"a divisor of train_timesteps ({train_timesteps}) with timestep_spacing trailing",
             sample_steps),
            (sample_steps > train_timesteps, f"{P}.sample_steps",
             f"at most train_timesteps ({train_timesteps})", sample_steps),
            (spacing == "quadratic" and train_timesteps < 3, f"{P}.timestep_spacing",
             "trailing with fewer than 3 train_timesteps (quadratic reaches round(0.8 T))", spacing),
            (amp == "fp16" and torch.device(device).type != "cuda", f"{P}.amp",
             f"none or bf16 on {device} (fp16 needs CUDA)", amp),
        ]  # fmt: skip
        for bad, field, what, value in rules:
            if bad:
                raise refuse(field, what, value)
        self.chains = 1
        self.event_shape = (ch, h, w)
        self.block_out_channels, self.layers_per_block, self.attention = ch_list, layers_per_block, attention
        self.num_classes, self.train_timesteps, self.sampler, self.sample_steps = (
            num_classes, train_timesteps, sampler, sample_steps)  # fmt: skip
        self.eta = 1.0 if sampler == "ddpm" else float(eta)
        # ddpm re-derives eps from the clipped x_0 (DDPMScheduler's update); ddim steps with the network's eps
        self.use_clipped = sampler == "ddpm"
        self.timestep_spacing, self.sample_noise = spacing, sample_noise
        # label dropout adds one embedding, index num_classes: the null class of classifier-free guidance
        self.label_dropout = p_drop
        self.null_class = num_classes if p_drop > 0 else None
        self.lr, self.weight_decay, self.batch_size, self.steps = lr, weight_decay, batch_size, steps
        self.ema_decay = ema_decay or None
        self.grad_clip, self.warmup, self.amp = grad_clip or None, warmup, amp
        self.compile, self.channels_last = compile, channels_last
        self.optimizer_state: dict[str, Any] | None = None  # the last fit's optimizer (carry_optimizer)
        self.device = torch.device(device)
        self.likelihood_timesteps, self.sample_batch = likelihood_timesteps, sample_batch
        self.losses = torch.zeros(0)  # per-step training losses of the last fit (diagnostics, tests)
        self.export_pipeline = bool(export_pipeline)
        # SIMS (simulator.mitigations.sims): an auxiliary network sampled as (1 + omega) eps - omega eps_aux
        self.aux: torch.nn.Module | None = None
        self.aux_omega = 0.0
        try:
            self.noise_scheduler = DDPMScheduler(**schedule)
            # "trailing" spacing starts the reverse chain at t = T-1, where x_T ~ N(0, I) matches the prior.
            self.sample_scheduler = DDIMScheduler(**schedule, clip_sample=True, set_alpha_to_one=True,
                                                  timestep_spacing="trailing")  # fmt: skip
        except (NotImplementedError, ValueError) as e:  # e.g. a beta_schedule diffusers does not know
            raise ValueError(f"init.pretrained: unsupported noise schedule {schedule}: {e}") from None
        if spacing == "trailing":
            self.sample_scheduler.set_timesteps(sample_steps)
            self.sample_timesteps = self.sample_scheduler.timesteps
        else:  # DDIMScheduler cannot step these (it strides evenly): diffusion_sampler.ddim_step does
            ts = diffusion_sampler.quadratic_timesteps(train_timesteps, sample_steps)
            self.sample_timesteps = torch.tensor(ts)
        self.reset(torch.Generator().manual_seed(0))  # a fresh object is reproducible

    # -- construction -------------------------------------------------------------------------

    def _build(self) -> UNet2DModel:
        """The UNet: plain ResNet blocks, attention (optional) only at the coarsest resolution."""
        chs = self.block_out_channels
        groups = math.gcd(math.gcd(*chs), 32)  # GroupNorm groups must divide every width, even (4, 8)
        attn = [self.attention and i == len(chs) - 1 for i in range(len(chs))]
        return UNet2DModel(
            sample_size=self.event_shape[1:],
            in_channels=self.event_shape[0],
            out_channels=self.event_shape[0],
            block_out_channels=chs,
            layers_per_block=self.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            add_attention=self.attention,
            attention_head_dim=None,  # one head per attention layer: tiny widths have no 8-dim heads
            norm_num_groups=groups,
            num_class_embeds=self.num_classes if self.null_class is None else self.num_classes + 1,
        )

    def reset(self, generator: torch.Generator) -> None:
        """Re-initialise the network and its EMA from scratch, deterministically from generator.

        With `pretrained`, "from scratch" is the pretrained checkpoint: its weights are read again.
        """
        # Layers initialise through the global CPU RNG (seeded_build forks it)
        unet = seeded_build(generator, lambda: diffusers_io.load_unet(self.pretrained) if self.pretrained
                            else self._build())  # fmt: skip
        self.unet = unet.to(self.device).eval()
        self.ema = copy.deepcopy(self.unet).requires_grad_(False) if self.ema_decay else None
        # diffusers' EMAModel, its shadow parameters aliasing self.ema's (so self.ema is the average)
        self.ema_tracker = EMA(self.ema, self.ema_decay) if self.ema is not None else None

    def _net(self) -> torch.nn.Module:
        """The weights used for sampling and likelihood: the EMA when there is one."""
        return self.ema if self.ema is not None else self.unet

    def _sampling_net(self) -> Any:
        """_net(), through torch.compile when `compile` is on (compiled once per network object)."""
        net = self._net()
        if not self.compile:
            return net
        if getattr(self, "_compiled", (None, None))[0] is not net:
            self._compiled = (net, torch.compile(net))
        return self._compiled[1]

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision where asked for; a no-op otherwise."""
        if AMP[self.amp] is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP[self.amp])

    def _eps(self, net: Any, x: torch.Tensor, t: torch.Tensor, y: Any, pad: bool = True) -> torch.Tensor:
        """Predicted noise in float32 for images x at integer timesteps t (one per row).

        CPU kernels pick code paths by tensor size, so a row's output moves by ~1e-6 with the batch it
        shares (enough to flip a pixel's 8-bit rounding now and then). So in sample/log_prob on the CPU
        the network always sees exactly CPU_ROWS rows, the tail padded: rows come out batch-independent.
        Elsewhere a compiled network sees sample_batch rows, the ragged last chunk padded (see _call_rows).
        """
        rows = self._call_rows(net) if pad else 0
        if not rows:
            return net(x, t, class_labels=y).sample.float()
        out = []
        for lo in range(0, len(x), rows):
            m = min(rows, len(x) - lo)
            xb = torch.cat([x[lo : lo + m], x.new_zeros(rows - m, *x.shape[1:])])
            tb = torch.cat([t[lo : lo + m], t.new_zeros(rows - m)])
            yb = None if y is None else torch.cat([y[lo : lo + m], y.new_zeros(rows - m)])
            out.append(net(xb, tb, class_labels=yb).sample[:m].float())
        return torch.cat(out)

    def _call_rows(self, net: Any) -> int:
        """Rows _eps pads every network call to (0: none). CPU_ROWS on the CPU; sample_batch for a
        compiled network elsewhere, so the ragged last chunk of a sample (or a shard) does not make
        dynamo compile a second, dynamic-shape graph (a guided call has 2 (sample_batch // 2) rows)."""
        if self.device.type == "cpu":
            return CPU_ROWS
        return self.sample_batch if isinstance(net, torch._dynamo.eval_frame.OptimizedModule) else 0

    def _rows(self, n: int) -> int:
        """Rows per sample/log_prob chunk: n, on the CPU rounded up to whole CPU_ROWS network calls."""
        return -(-n // CPU_ROWS) * CPU_ROWS if self.device.type == "cpu" else n

    # -- training -----------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """Validate uint8 images (1, n, ch, h, w) or (n, ch, h, w); return (n, ch, h, w)."""
        if x.dim() == 4:
            x = x.unsqueeze(0)
        shape_ok = x.dim() == 5 and x.shape[0] == 1 and tuple(x.shape[2:]) == self.event_shape
        if x.dtype != torch.uint8 or not shape_ok:
            raise ValueError(f"diffusion expects uint8 (1, n, *{self.event_shape}), got {x.dtype} {x.shape}")
        return x[0]

    def _labels(self, labels: torch.Tensor | None, n: int, what: str) -> torch.Tensor | None:
        """Validate class labels (n,) or (1, n) against num_classes; None for an unconditional model."""
        if self.num_classes is None:
            return None  # an unconditional model ignores labels, as the other families do
        if labels is None:
            raise ValueError(f"diffusion with num_classes={self.num_classes} needs labels in {what}")
        labels = labels.reshape(-1).long()
        if len(labels) != n or (n and (labels.min() < 0 or labels.max() >= self.num_classes)):
            raise ValueError(f"{what} labels must be {n} ints in [0, {self.num_classes}): {labels.shape}")
        return labels.to(self.device)

    def objective(
        self, data: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None,
        warmup: int | None, ema: str,
    ) -> tuple[Objective, TrainOptions, EMA | None]:  # fmt: skip
        """Denoising score matching (Ho et al.'s L_simple) on uint8 images (1, n, ch, h, w) with AdamW.

        A warm start carries the EMA too unless ema="restart" (the average then starts again from the
        current weights, with its warm-up). loss_first / loss_last are means over the first / last
        min(10, steps) steps.
        """
        choose("train.ema", ema, ("carry", "restart"))  # the config's choice, checked there too
        x8 = self._check(data).to(self.device)  # uint8 on the device; scaled per minibatch
        if x8.shape[0] == 0:
            raise ValueError("diffusion fit needs at least one image")
        y = self._labels(labels, x8.shape[0], "fit")
        w = check_weights(weights, 1, x8.shape[0])
        options = TrainOptions(
            optimizer="adamw", lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            warmup=self.warmup if warmup is None else warmup, amp=self.amp, compile=self.compile,
            channels_last=self.channels_last,
        )  # fmt: skip
        if ema == "restart" and self.ema_tracker is not None:
            self.ema_tracker.restart(self.unet.parameters())
        return _DiffusionObjective(self, x8, y, None if w is None else w[0]), options, self.ema_tracker

    def fit_stats(self, result: FitResult, steps: int) -> dict[str, Any]:
        self.losses = result.losses
        first, last = result.mean_first_last(10)
        return {"loss_first": first, "loss_last": last, "steps": float(steps), "seconds": result.seconds}

    @property
    def ema_steps(self) -> int:
        """EMA updates so far, across warm-started fits: drives the EMA warm-up."""
        return self.ema_tracker.optimization_step if self.ema_tracker is not None else 0

    # -- sampling -----------------------------------------------------------------------------

    def sample_labels(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        """The labels (n,) that sample(n, generator=generator) draws when given none: uniform, per sample."""
        if self.num_classes is None:
            raise ValueError("sample_labels needs a class-conditional model (num_classes)")
        return diffusion_sampler.sample_labels(self.num_classes, n, generator.initial_seed())

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        indices: Any = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Draw uint8 (1, n, ch, h, w) with DDIM steps at `sample_timesteps` (ancestral for sampler="ddpm").

        Sample i's noise comes from derive_seed(generator.initial_seed(), i) (per_sample or counter:
        see diffusion_sampler), so it does not depend on sample_batch. With `indices` (ints in [0, n)),
        only those rows of sample(n) are drawn and returned, (1, len(indices), ch, h, w), in that order:
        on the CPU bit for bit the same rows (the network sees padded CPU_ROWS batches), so ranks can
        each draw a shard. Temperature s scales the initial and per-step noise by sqrt(s) (s < 1: the
        sampling bias of Alemohammad et al.; a heuristic for diffusion, not an exact variance scaling of
        p). `guidance` w > 0: classifier-free guidance, eps = (1 + w) eps(x, y) - w eps(x, null) (needs
        label_dropout; see diffusion_sampler).
        Class-conditional models draw missing labels uniformly, per sample, from its own seed.
        """
        seed = generator.initial_seed()
        return diffusion_sampler.draw(self, n, labels, seed, temperature, indices, guidance)

    # -- likelihood bound ---------------------------------------------------------------------

    def bound_terms(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *, seed: int = LIKELIHOOD_SEED
    ) -> dict[str, torch.Tensor]:
        """The bound's parts in nats, (n,) float64 on the CPU: prior L_T, diffusion sum L_{t-1}, decoder L_0
        (estimated as diffusion_bound.terms describes)."""
        return bound.terms(self, x, labels, seed, BOUND_BYTES)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the variational bound, (1, n) nats of uint8 images: a lower bound on log p(x), on x's device.

        bits/dim = -log_prob / (D ln 2). A class-conditional model given no labels bounds the marginal:
        log p(x) >= logsumexp_y (log(1/C) - L(x | y)), with the same noise draws for every class.
        """
        n = self._check(x).shape[0]
        if self.num_classes is None or labels is not None:
            lp = cast(torch.Tensor, -sum(self.bound_terms(x, labels).values()))
        else:
            per = [cast(torch.Tensor, -sum(self.bound_terms(x, torch.full((n,), c)).values()))
                   for c in range(self.num_classes)]  # fmt: skip
            lp = torch.logsumexp(torch.stack(per), 0) - math.log(self.num_classes)
        return lp.float().unsqueeze(0).to(x.device)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors: 'unet.*' (trained weights), 'ema.*' (averaged weights), 'ema_steps', and
        'null_class' when label dropout trained one (so a checkpoint says whether it can be guided)."""
        out = plain_state(self.unet, "unet.")
        if self.ema is not None:
            out.update(plain_state(self.ema, "ema."))
        out["ema_steps"] = torch.tensor(self.ema_steps)
        if self.null_class is not None:
            out["null_class"] = torch.tensor(self.null_class)
        if self.aux is not None:  # SIMS: the auxiliary network and its weight, saved with the generation
            out.update(plain_state(self.aux, "aux."))
            out["aux_omega"] = torch.tensor(self.aux_omega, dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        """Load a state_dict of this family, or bare UNet weights (a pretrained start: EMA = weights)."""
        if not any(k.startswith("unet.") for k in state):
            state = {f"unet.{k}": v for k, v in state.items()}
        saved = int(state["null_class"]) if "null_class" in state else None
        if saved != self.null_class:
            raise ValueError(
                f"model.options.label_dropout: the checkpoint's null class is {saved}, this model's "
                f"{self.null_class} (label_dropout > 0 adds one; both must agree)"
            )
        part = {
            p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")}
            for p in ("unet", "ema")
        }
        out = self.unet.load_state_dict(part["unet"])
        if self.ema is not None:
            self.ema.load_state_dict(part["ema"] or part["unet"])
        if self.ema_tracker is not None:
            self.ema_tracker.optimization_step = int(state.get("ema_steps", 0))
        aux = {k[4:]: v for k, v in state.items() if k.startswith("aux.")}
        self.aux, self.aux_omega = None, 0.0
        if aux:  # SIMS' auxiliary network: the UNet's architecture, its own weights
            self.aux = copy.deepcopy(self.unet).requires_grad_(False).eval()
            self.aux.load_state_dict(aux)
            self.aux_omega = float(state["aux_omega"])
        return out

    def set_aux(self, aux: DiffusionFamily | None, omega: float) -> None:
        """SIMS' negative guidance: sample with (1 + omega) eps - omega eps_aux, eps_aux from aux's sampling
        weights (a copy, kept and saved with this model); None removes it (simulator.mitigations.sims)."""
        if aux is None:
            self.aux, self.aux_omega = None, 0.0
            return
        self.aux = copy.deepcopy(aux._net()).requires_grad_(False).eval().to(self.device)
        self.aux_omega = float(omega)

    def sampling(self) -> dict[str, Any]:
        """The sampler's settings, as sampling.json beside an exported pipeline records them: what
        DDIMPipeline's call takes (num_inference_steps, eta, use_clipped_model_output) and the timesteps
        visited, which DDIMScheduler cannot express for timestep_spacing=quadratic."""
        config = self.sample_scheduler.config
        return {"pipeline": "DDIMPipeline", "sampler": self.sampler, "eta": self.eta,
                "use_clipped_model_output": self.use_clipped, "timestep_spacing": self.timestep_spacing,
                "num_inference_steps": self.sample_steps, "timesteps": self.sample_timesteps.tolist(),
                "clip_sample": bool(config.clip_sample), "prediction_type": config.prediction_type,
                "noise": diffusion_sampler.noise_mode(self)}  # fmt: skip

    def export(self, directory: str | Path) -> Path | None:
        """With export_pipeline: directory/pipeline/, a DDIMPipeline (the EMA weights as its unet, the
        run's DDIM scheduler: schedule, trailing spacing, clipping) that diffusers' DDIMPipeline and
        DDPMPipeline load, and pipeline/sampling.json (`sampling()`): the run's sampler, exactly. With SIMS'
        auxiliary network, pipeline/aux_unet/ too and sampling.json's "sims": the run's eps is
        (1 + omega) unet - omega aux_unet (docs/images.md)."""
        if not self.export_pipeline:
            return None
        out = Path(directory) / "pipeline"
        sampling = self.sampling()
        if self.aux is not None:
            sampling["sims"] = {"omega": self.aux_omega, "aux_unet": diffusers_io.AUX_UNET}
        return diffusers_io.export_pipeline(self._net(), self.sample_scheduler, out, sampling, aux=self.aux)

    def parameters_vector(self) -> torch.Tensor:
        """The weights used for sampling (the EMA when there is one) flattened to (1, P) on the CPU."""
        return flat_parameters(self._net())
