"""Neon: negative extrapolation from self-training (Alemohammad et al. 2025, arXiv 2510.03597).

After G_t is fitted (theta_base), a copy is fine-tuned on n_self of its own samples for `steps` steps
(theta_self), and the generation keeps the merge

    theta = (1 + w) theta_base - w theta_self

w > 0 moves away from what self-training does to the model: with a mode-seeking sampler (sample.
temperature < 1, guidance) self-training narrows the model, and the merge widens it back (the paper's
toy: a 2-D Gaussian, zeta = 1.1 mode-seeking, w > 0 lowers the FID; zeta = 0.9, w < 0 does). The paper
applies it once to a trained model (`when: gen0`); in the loop it may apply at every generation.

What is merged: every floating-point tensor of the family's state_dict that fine-tuning changed (weights,
EMA weights, trained buffers); integer tensors and tensors the fine-tune left equal (counters, masks,
flags) are the base's, bit for bit. For the Gaussian family that is the mean and the covariance, and the
merged covariance must stay positive definite (its eigenvalues are checked; a chain where it is not
stops the run as diverged, in one line). gmm (components match between fits only up to a permutation)
and kde (its parameters are its training points) have no parameters to merge: refused.

The copy's samples are drawn with the run's sampler (sample.temperature, sample.guidance), or at their own
`temperature` (the paper's toy draws them at a score scale zeta and evaluates at zeta = 1; for a Gaussian,
scaling the score by zeta samples N(mu, Sigma / zeta): temperature 1 / zeta). They and the fine-tune's
minibatches come from the stream (seed, t, "neon"). The loop
writes the merged model into gen_XXX.tmp with fit.json, so a resume finds it there and never merges
again; an interruption before fit.json refits and merges anew, drawing the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from simulator import seeding
from simulator.mitigations.base import fine_tuned_copy, last_loss, real_labels, self_samples
from simulator.mitigations.options import N_SELF_NEON as N_SELF
from simulator.mitigations.options import STEPS_NEON as STEPS
from simulator.mitigations.options import NeonOptions
from simulator.models.base import Diverged
from simulator.options import ConfigError

__all__ = ["NeonOptions", "check", "merge", "step"]

# families whose parameters have no merge, by config name and by class (the programmatic path)
NOT_MERGED = {
    "gmm": "its components match between two fits only up to a permutation",
    "kde": "its parameters are its training points",
}
NOT_MERGED_CLASSES = {"simulator.models.gmm:GMMFamily": "gmm", "simulator.models.kde:KDEFamily": "kde"}


def check(neon: Mapping[str, Any], family: str, path: str | None) -> None:
    """One ConfigError line for a family or path the merge is not defined for (options: the schema)."""
    if neon.get("w") is None:
        return
    if family in NOT_MERGED:
        raise ConfigError(f"mitigation.neon.w: model.family={family} has no parameters to merge "
                          f"({NOT_MERGED[family]}); use gaussian, flow, flow_ensemble, glow or diffusion, "
                          "or mitigation.neon.w=null")  # fmt: skip
    if path == "statistics":
        raise ConfigError("mitigation.neon.w: model.path=statistics draws no samples to fine-tune on; use "
                          "model.path=samples")  # fmt: skip
    if neon.get("lr") is not None and family == "gaussian":
        raise ConfigError("mitigation.neon.lr: model.family=gaussian refits in closed form (no learning "
                          "rate); set it to null")  # fmt: skip


def merge(base: Mapping[str, Any], tuned: Mapping[str, Any], w: float) -> dict[str, Any]:
    """(1 + w) base - w tuned on every floating-point tensor the two differ in; the rest is base's.
    w = 0 is base bit for bit, w = -1 tuned bit for bit (0 * x + y = y for finite x)."""
    if set(base) != set(tuned):
        raise ValueError(
            f"neon: the fine-tuned copy's state has other keys ({sorted(set(base) ^ set(tuned))})"
        )
    out: dict[str, Any] = {}
    for key, b in base.items():
        s = tuned[key]
        same = not isinstance(b, torch.Tensor) or not b.is_floating_point() or torch.equal(b, s)
        out[key] = b if same or w == 0 else (1 + w) * b - w * s.to(b.device, b.dtype)
    return out


def _positive_definite(model: Any, state: Mapping[str, Any], w: float) -> None:
    """The merged covariance of a Gaussian family (its state's 'cov'): positive definite in every chain."""
    cov = state.get("cov")
    if cov is None:
        return
    low = torch.linalg.eigvalsh(cov.double()).min(-1).values  # (C,)
    bad = (~(low > 0)).nonzero().flatten()
    if len(bad):
        k = int(bad[0])
        raise Diverged(f"mitigation.neon: the merged covariance (1 + w) Sigma_base - w Sigma_self of "
                       f"chain {k} is not positive definite (w={w}, least eigenvalue {float(low[k]):.3g}; "
                       f"{len(bad)} of {len(low)} chains); use a smaller w")  # fmt: skip


def step(opts: NeonOptions, model: Any, t: int, *, make_model: Any, pool: Any, seed: int) -> dict[str, Any]:
    """Replace model's parameters by the Neon merge (at generation t, where `when` applies); returns the
    row's training stats of the step ({} when it does not apply)."""
    if opts.w is None or (opts.when == "gen0" and t > 0) or (opts.when == "later" and t == 0):
        return {}
    name = f"{type(model).__module__}:{type(model).__qualname__}"
    if name in NOT_MERGED_CLASSES:
        family = NOT_MERGED_CLASSES[name]
        raise ConfigError(f"mitigation.neon.w: model.family={family} has no parameters to merge "
                          f"({NOT_MERGED[family]})")  # fmt: skip
    n_self, steps = opts.n_self or N_SELF, opts.steps or STEPS
    g = seeding.generator(seed, t, "neon")
    bias = dict(getattr(pool, "bias", None) or {})
    if opts.temperature is not None:  # the paper's toy: self-samples at score scale zeta = 1 / temperature
        bias["temperature"] = opts.temperature
    x, y = self_samples(model, n_self, g, bias=bias, real_labels=real_labels(pool))
    tuned, stats = fine_tuned_copy(model, make_model, x, y, steps=steps, lr=opts.lr, generator=g)
    merged = merge(model.state_dict(), tuned.state_dict(), float(opts.w))
    _positive_definite(model, merged, float(opts.w))
    model.load_state_dict(merged)
    return {"neon": {"w": float(opts.w), "n_self": n_self, "steps": steps, "loss_last": last_loss(stats)}}
