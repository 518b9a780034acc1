"""SIMS: negative guidance from a self-trained model (Alemohammad et al. 2024, arXiv 2408.16333).

After G_t (the base, theta_r) is fitted, an auxiliary model theta_s is the base fine-tuned on n_self of
the base's own samples for `steps` steps (the paper's n_s and training budget B), and G_t samples with

    s(x, t) = (1 + omega) s_base(x, t) - omega s_aux(x, t)

which for epsilon-prediction is the same combination of the two noise predictions (s = -eps / sigma_t).
The auxiliary network is saved with the generation (the diffusion family's state_dict: 'aux.*' and
'aux_omega'), so sampling a committed generation, a resume and sample.save=false redraws give the same
samples. In the loop this is the paper's synthetic augmentation loop (its Section 4.2.2): each
generation's base is trained on the real set polluted by the previous generation's SIMS samples
(policy=mix with lam = |D_p| / |D_r|), gets its own auxiliary model, and draws the next pollution. The
paper reports that SIMS then improves on its previous generation only while |D_p| < 30k on CIFAR-10
(60% of |D_r|) and |D_p| < 15k on FFHQ-64 (20% of |D_r|).

omega = 0 samples the base exactly as without SIMS (the auxiliary network is not called). The auxiliary
model's samples and its fine-tune's minibatches come from the stream (seed, t, "sims"). Diffusion only:
the guidance combines scores, which only a diffusion family has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from simulator import seeding
from simulator.mitigations.base import fine_tuned_copy, last_loss, real_labels, self_samples
from simulator.mitigations.options import N_SELF_SIMS as N_SELF
from simulator.mitigations.options import STEPS_SIMS as STEPS
from simulator.mitigations.options import SimsOptions
from simulator.options import ConfigError

__all__ = ["SelfGuided", "SimsOptions", "check", "step"]

FAMILIES = ("diffusion",)  # the families with a score to guide (a SelfGuided model)


@runtime_checkable
class SelfGuided(Protocol):
    """A family that samples with negative guidance from an auxiliary model of its own kind."""

    def set_aux(self, aux: Any, omega: float) -> None:
        """Guide sampling away from aux (a model of the same family) with weight omega; None: remove it."""


def check(sims: Mapping[str, Any], family: str) -> None:
    """One ConfigError line for a family without a score to guide (options: the schema)."""
    if sims.get("omega") is not None and family not in FAMILIES:
        raise ConfigError(f"mitigation.sims.omega: negative guidance combines diffusion scores; "
                          f"model.family={family} has none (use model=diffusion or model=diffusion_tiny, "
                          "or mitigation.sims.omega=null)")  # fmt: skip


def step(opts: SimsOptions, model: Any, t: int, *, make_model: Any, pool: Any, seed: int) -> dict[str, Any]:
    """Fine-tune the auxiliary model of G_t on the base's own samples and attach it to model; returns
    the row's training stats of the step."""
    if opts.omega is None:
        return {}
    if not isinstance(model, SelfGuided):
        raise ConfigError(f"mitigation.sims.omega: negative guidance combines diffusion scores; "
                          f"{type(model).__name__} has none")  # fmt: skip
    model.set_aux(None, 0.0)  # the base alone draws the auxiliary model's training set (a warm start's
    g = seeding.generator(seed, t, "sims")  # model still holds the previous generation's)
    n_self, steps = opts.n_self or N_SELF, opts.steps or STEPS
    x, y = self_samples(model, n_self, g, bias=getattr(pool, "bias", None), real_labels=real_labels(pool))
    aux, stats = fine_tuned_copy(model, make_model, x, y, steps=steps, lr=opts.lr, generator=g)
    model.set_aux(aux, float(opts.omega))
    return {"sims": {"omega": float(opts.omega), "n_self": n_self, "steps": steps,
                     "loss_last": last_loss(stats)}}  # fmt: skip
