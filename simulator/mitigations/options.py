"""The mitigations' options (the config's `mitigation` section): plain dataclasses, importable without
torch, so that the config's schema (simulator.config) reads them and `import simulator` stays light."""

from __future__ import annotations

from dataclasses import dataclass

from simulator.options import opt

WHEN = ("every", "gen0", "later")  # Neon: generations 0..T, 0 alone, 1..T (generation 0 shared)
N_SELF_NEON, STEPS_NEON = 1000, 50  # the defaults of Neon's n_self and steps (a null in the config)
N_SELF_SIMS, STEPS_SIMS = 1000, 100  # SIMS'


@dataclass
class NeonOptions:
    """mitigation.neon: the merge after every fit (null w: off)."""

    w: float | None = None  # merge weight: theta = (1 + w) theta_base - w theta_self (null: off)
    n_self: int | None = opt(N_SELF_NEON, low=1)  # samples of G_t the copy is fine-tuned on
    steps: int | None = opt(STEPS_NEON, low=1)  # fine-tuning steps (closed forms refit: steps unused)
    lr: float | None = opt(None, low=0, strict=True)  # fine-tuning learning rate (null: the family's)
    when: str | None = opt("every", choices=WHEN)  # every generation, generation 0 only (the paper's use),
    # or every generation but 0 (later: generation 0 as the runs without Neon fit it, share_gen0)
    temperature: float | None = opt(None, low=0, strict=True)  # the self-samples' (null: sample.temperature)


@dataclass
class SimsOptions:
    """mitigation.sims: the auxiliary model of negative guidance, made after every fit (null omega: off)."""

    omega: float | None = opt(None, low=0)  # guidance weight: (1 + omega) s_base - omega s_aux (null: off)
    n_self: int | None = opt(N_SELF_SIMS, low=1)  # base samples the auxiliary model is fine-tuned on (n_s)
    steps: int | None = opt(STEPS_SIMS, low=1)  # fine-tuning steps of the auxiliary model (the budget B)
    lr: float | None = opt(None, low=0, strict=True)  # its learning rate (null: the family's)


@dataclass
class Mitigation:
    """The config's mitigation section: at most one of its mitigations is on."""

    neon: NeonOptions = opt(NeonOptions())
    sims: SimsOptions = opt(SimsOptions())
