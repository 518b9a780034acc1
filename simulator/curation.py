"""Curation: keep one of k candidate samples, by a reward (Ferbach et al. 2024).

From k candidates x_1..x_k of the model, the kept one is x_i with the Bradley-Terry probability
softmax(beta r(x))_i; beta = None is the hard limit beta -> infinity, the best of k (argmax). For
large k the kept sample's law tends to the exponential tilt p(x) exp(beta r(x)) / Z, and iterating
curation drives the model towards the reward's maximisers.

Rewards r(x), named by `sample.curation_reward`, with parameters in `sample.curation_options`:
- model, truth: the log-density of the model itself, or of the exact truth (toy data);
- linear:       r = a . x, options.direction = a (one number per coordinate of the flattened sample);
- quadratic:    r = -||x - c||^2 / (2 scale^2), options.centre = c, options.scale (default 1);
- classifier:   a classifier's confidence on image samples: the probability it gives the sample's own
                class when the family is class-conditional, otherwise its maximum softmax probability.
                options.checkpoint is a state dict of simulator.classifiers' architecture
                options.arch (mlp | cnn | resnet18; width, hidden as in make_classifier), e.g. the
                model.pt of a contamination cell; the number of classes is read from the checkpoint.

The soft draw of a sample uses one uniform of its own (`uniforms`, drawn once per generation for all
n samples), so a sample's choice does not depend on how the samples are sharded across processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from simulator.options import ConfigError, choose

REWARDS = ("model", "truth", "linear", "quadratic", "classifier")
OPTIONS = {  # the options each reward takes (sample.curation_options)
    "model": (),
    "truth": (),
    "linear": ("direction",),
    "quadratic": ("centre", "scale"),
    "classifier": ("checkpoint", "arch", "width", "hidden"),
}
REQUIRED = {"linear": ("direction",), "quadratic": ("centre",), "classifier": ("checkpoint",)}

# reward(model, x (C, m, *event), labels (m,) or None) -> (C, m)
Reward = Callable[[Any, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _vector(key: str, v: Any) -> list[float]:
    ok = isinstance(v, (list, tuple)) and len(v) > 0
    ok = ok and all(not isinstance(e, bool) and isinstance(e, (int, float)) and math.isfinite(e) for e in v)
    if not ok:
        raise ConfigError(f"{key}: must be a non-empty list of finite numbers, got {v!r}")
    return [float(e) for e in v]


def check(name: Any, options: Any, beta: Any) -> None:
    """Raise ConfigError (one line naming the field) for a bad reward name, its options or beta: the
    rewards' own rules, which the config's walk (simulator.checks) calls with plain values."""
    if name not in REWARDS:
        raise ConfigError(f"sample.curation_reward: must be one of {', '.join(REWARDS)}; got {name!r}")
    if beta is not None and (
        isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0
    ):
        raise ConfigError(
            f"sample.curation_beta: must be null (best of k) or a finite number >= 0, got {beta!r}"
        )
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(
            f"sample.curation_options: must be a mapping of option names to values, got {options!r}"
        )
    for key in options:
        if key not in OPTIONS[name]:
            allowed = ", ".join(OPTIONS[name]) or "none"
            raise ConfigError(
                f"sample.curation_options.{key}: not an option of reward {name} (allowed: {allowed})"
            )
    for key in REQUIRED.get(name, ()):
        if options.get(key) is None:
            raise ConfigError(f"sample.curation_options.{key}: reward {name} needs it")
    for key in ("direction", "centre"):
        if key in options:
            _vector(f"sample.curation_options.{key}", options[key])
    scale = options.get("scale", 1.0)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ConfigError(f"sample.curation_options.scale: must be a finite number > 0, got {scale!r}")
    if name == "classifier":
        path = Path(str(options["checkpoint"])).expanduser()
        if not path.is_file():
            raise ConfigError(f"sample.curation_options.checkpoint: file not found: {path}")
        from simulator import classifiers  # lazily: the networks and their trainer only for this reward

        choose("sample.curation_options.arch", options.get("arch", "cnn"), classifiers.ARCHS)


def _flat(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.reshape(*x.shape[:2], d).double()


def make_reward(
    name: str,
    options: dict[str, Any] | None,
    event_shape: tuple[int, ...],
    truth: Any = None,
    device: str = "cpu",
) -> Reward:
    """The reward function named by `name`; a spec that does not fit the data raises ConfigError."""
    options = dict(options or {})
    d = math.prod(event_shape)
    if name == "model":
        return lambda m, x, y: m.log_prob(x)
    if name == "truth":
        if truth is None:
            raise ConfigError(
                "sample.curation_reward: truth needs a data source whose density is known (toy data)"
            )
        return lambda m, x, y: truth.log_prob(x)
    if name in ("linear", "quadratic"):
        key = "direction" if name == "linear" else "centre"
        v = torch.tensor(_vector(f"sample.curation_options.{key}", options.get(key)), dtype=torch.float64)
        if len(v) != d:
            raise ConfigError(
                f"sample.curation_options.{key}: needs {d} numbers (the flattened sample), got {len(v)}"
            )
        if name == "linear":
            return lambda m, x, y: _flat(x, d).cpu() @ v
        scale = float(options.get("scale", 1.0))
        return lambda m, x, y: -(_flat(x, d).cpu() - v).square().sum(-1) / (2 * scale**2)
    if name == "classifier":
        return _classifier_reward(options, event_shape, device)
    raise ConfigError(f"sample.curation_reward: must be one of {', '.join(REWARDS)}; got {name!r}")


def _classifier_reward(options: dict[str, Any], event_shape: tuple[int, ...], device: str) -> Reward:
    """Confidence of a saved classifier: p(own class | x) for labelled samples, else max_c p(c | x)."""
    from simulator import classifiers  # lazily: the networks and their trainer only for this reward

    path = Path(str(options["checkpoint"])).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: one line
        raise ConfigError(
            f"sample.curation_options.checkpoint: cannot read {path} as a state dict: {e}"
        ) from None
    weights = (
        [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
        if isinstance(state, dict)
        else []
    )
    if not weights:
        raise ConfigError(f"sample.curation_options.checkpoint: {path} holds no classifier state dict")
    arch = options.get("arch", "cnn")
    kwargs = {k: options[k] for k in ("width", "hidden") if options.get(k) is not None}
    try:
        net = classifiers.make_classifier(
            arch,
            tuple(event_shape),
            weights[-1].shape[0],
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        net.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"sample.curation_options.checkpoint: {path} does not fit arch={arch} {kwargs}: {first}"
        ) from None
    net = net.to(device).eval()

    @torch.no_grad()
    def reward(m: Any, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, *event_shape)
        probs = torch.cat([
            net(classifiers.to_input(flat[i : i + 512], device)).double().softmax(-1).cpu()
            for i in range(0, len(flat), 512)
        ])  # fmt: skip
        probs = probs.view(*x.shape[:2], -1)
        if y is None:
            return probs.amax(-1)
        return probs.gather(-1, y.view(1, -1, 1).expand(x.shape[0], -1, 1).cpu()).squeeze(-1)

    return reward


def soft_select(reward: torch.Tensor, k: int, beta: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Indices (C, n) into the C x (k n) candidates: in each group of k consecutive ones, candidate i
    with probability softmax(beta r)_i, drawn by inverting the cumulative weights at uniforms (C, n)."""
    chains, total = reward.shape
    r = reward.double().view(chains, total // k, k)
    w = torch.exp(beta * (r - r.amax(dim=2, keepdim=True))).nan_to_num(0.0)  # the best gets weight 1
    cum = w.cumsum(dim=2)
    # candidate j is kept when cum_{j-1} <= u * cum_k < cum_j: probability w_j / sum(w); u < 1 keeps j < k
    pick = (cum <= uniforms.double().unsqueeze(2) * cum[:, :, -1:]).sum(dim=2)
    pick = torch.where(
        cum[:, :, -1] > 0, pick, r.argmax(dim=2)
    )  # no finite weight (e.g. all -inf): best of k
    return torch.arange(total // k).unsqueeze(0) * k + pick
