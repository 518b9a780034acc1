"""Mitigations of collapse that fine-tune a fitted model on its own samples: one module each.

- neon: negative extrapolation in weight space, theta = (1 + w) theta_base - w theta_self (any family
  whose parameters merge: gaussian, flow, flow_nsf, flow_ensemble, glow, diffusion);
- sims: negative guidance from a self-trained auxiliary model, (1 + omega) s_base - omega s_aux (diffusion).

Each declares its options (the config's `mitigation.neon` / `mitigation.sims`, a schema in
simulator.config), its one-line checks (`check`, called by simulator.checks' walk) and its post-fit step.
`after_fit(section)` is the loop's one call site (simulator.loop.TrainOptions.after_fit): it runs after
G_t is fitted or loaded, before the model is written to gen_XXX.tmp, so the committed model is the
mitigated one and a resume finds it there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from simulator.mitigations.options import Mitigation, NeonOptions, SimsOptions
from simulator.options import ConfigError, parse

__all__ = ["Mitigation", "NeonOptions", "SimsOptions", "after_fit", "check"]

AfterFit = Callable[..., dict[str, Any]]  # (model, t, *, make_model, pool, seed) -> the row's train stats


def check(run: Mapping[str, Any]) -> None:
    """One ConfigError line for a mitigation the run cannot take (the section's types and bounds: the
    RunConfig schema, checked before)."""
    from simulator.mitigations import neon, sims  # torch comes with the families, not with the schema

    section = run.get("mitigation") or {}
    model = run.get("model") or {}
    family, path = model.get("family"), model.get("path")
    on_neon = (section.get("neon") or {}).get("w") is not None
    on_sims = (section.get("sims") or {}).get("omega") is not None
    if on_neon and on_sims:
        raise ConfigError("mitigation: set one of mitigation.neon.w and mitigation.sims.omega (each "
                          "fine-tunes its own copy of G_t; together: a regime of neither paper)")  # fmt: skip
    neon.check(section.get("neon") or {}, str(family), path)
    sims.check(section.get("sims") or {}, str(family))
    if run.get("share_gen0") and on_neon and ((section.get("neon") or {}).get("when") or "every") != "later":
        raise ConfigError("mitigation.neon.when: share_gen0 shares generation 0 with the sweep's other runs, "
                          "which Neon would merge; set mitigation.neon.when=later (generations 1..T) or "
                          "share_gen0=false")  # fmt: skip
    if run.get("share_gen0") and on_sims:
        raise ConfigError("mitigation.sims.omega: share_gen0 shares generation 0's samples with the sweep's "
                          "other runs, which SIMS would draw guided; set share_gen0=false")  # fmt: skip


def after_fit(section: Mapping[str, Any] | None) -> AfterFit | None:
    """The loop's post-fit step for a config's mitigation section (plain values), or None when off."""
    given = {
        k: {f: v for f, v in (sub or {}).items() if v is not None} for k, sub in dict(section or {}).items()
    }
    options = parse("mitigation", Mitigation, given)  # null: the option's default (the config writes nulls)
    if options.neon.w is not None and options.sims.omega is not None:
        raise ConfigError("mitigation: set one of mitigation.neon.w and mitigation.sims.omega")
    from simulator.mitigations import neon, sims

    if options.neon.w is not None:
        return partial(neon.step, options.neon)
    if options.sims.omega is not None:
        return partial(sims.step, options.sims)
    return None
