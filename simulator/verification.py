"""Verification: synthetic samples kept or dropped by a verifier that errs at set rates.

Feng et al. 2024 ("Beyond model collapse: scaling up with synthesized data requires verification", arXiv
2406.07515): a generator labels its samples with errors, a verifier selects among them, and a model
trained on the selected data can reach the accuracy of one trained on clean labels -- or lose to the
generator -- depending on the share of correct labels among what the verifier keeps,

    p_* = P(label correct | kept) = (1 - p) phi / ((1 - p) phi + p psi),

p the generator's label error, phi = P(keep | correct), psi = P(keep | wrong): a linear classifier
fitted to the kept rows of a symmetric two-class Gaussian mixture points along the Bayes direction when
p_* > 1/2 and against it when p_* < 1/2 (the breakdown at 1/2; `lda_gap`), and verification helps
whenever p_* > 1 - p.

In the loop (a class-conditional family): every candidate of S_t is drawn for its class c, and reported
with the label y = c, or with probability `sample.label_noise` = p a uniformly drawn other class (the
generator's labelling error). `sample.verifier: oracle` keeps a candidate whose label is its class with
probability keep_correct (phi) and one whose label is not with probability keep_wrong (psi)
(`sample.verifier_options`): a verifier of known error rates 1 - phi and psi. Of the
`sample.curation_k` = k candidates of each row of S_t the first kept one enters S_t with its reported
label (the first candidate when the verifier keeps none, probability q^k with q = P(drop)), so S_t keeps
its size: the share of correct labels in S_t is exactly (1 - q^k) p_* + q^k (1 - p)(1 - phi)/q
(`kept_correct`; k = 1: 1 - p, the verifier cannot choose).
Every draw is one uniform per candidate of S_t from the streams (seed, t, "label_noise") and
(seed, t, "verifier"), so a row's fate does not depend on how S_t is sharded across processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from simulator import seeding
from simulator.options import ConfigError, problem

VERIFIERS = ("oracle",)
OPTIONS: dict[str, dict[str, float]] = {"oracle": {"keep_correct": 1.0, "keep_wrong": 0.0}}


def read_options(name: str, options: Any) -> dict[str, float]:
    """The verifier's options over its defaults; an unknown key or a bad value is one line."""
    if not isinstance(options or {}, Mapping):
        raise ConfigError(problem("sample.verifier_options", "a mapping", options))
    given = dict(options or {})
    unknown = sorted(set(given) - set(OPTIONS[name]))
    if unknown:
        raise ConfigError(
            f"sample.verifier_options.{unknown[0]}: not an option of verifier {name} "
            f"(allowed: {', '.join(OPTIONS[name])})"
        )
    out = {**OPTIONS[name], **given}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(problem(f"sample.verifier_options.{key}", "a probability in [0, 1]", value))
    if out["keep_correct"] + out["keep_wrong"] == 0:
        raise ConfigError(
            "sample.verifier_options: keep_correct and keep_wrong are both 0: the verifier keeps nothing"
        )
    return {k: float(v) for k, v in out.items()}


def check(run: Mapping[str, Any]) -> None:
    """One ConfigError line for verification the config cannot run (the config's check walk calls this)."""
    sample = run.get("sample") or {}
    name, noise, options = sample.get("verifier"), sample.get("label_noise"), sample.get("verifier_options")
    if name is None and options:
        raise ConfigError(
            f"sample.verifier_options: set without sample.verifier (one of {', '.join(VERIFIERS)})"
        )
    if name is not None and name not in VERIFIERS:
        raise ConfigError(problem("sample.verifier", f"one of {', '.join(VERIFIERS)} or null", name))
    if noise is not None and (
        isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1
    ):
        raise ConfigError(problem("sample.label_noise", "a probability in [0, 1)", noise))
    if name is None and not noise:
        return
    if name is not None:
        read_options(name, options)
    field = "sample.verifier" if name is not None else "sample.label_noise"
    if ((run.get("model") or {}).get("options") or {}).get("num_classes") is None:
        raise ConfigError(
            f"{field}: labels are drawn by a class-conditional model only; set "
            "model.options.num_classes (e.g. model=diffusion_tiny, data=digits)"
        )
    if name is None and (sample.get("curation_k") or 1) > 1:
        raise ConfigError(
            "sample.curation_k: with sample.label_noise and no sample.verifier there is nothing to "
            "choose by; set sample.verifier=oracle or sample.curation_k=1"
        )
    if name is not None and (sample.get("curation_k") or 1) < 2:
        raise ConfigError(
            "sample.verifier: the verifier keeps one of sample.curation_k candidates per row; set "
            "sample.curation_k >= 2"
        )
    if sample.get("selection") is not None:
        raise ConfigError(
            "sample.selection: entropy selection draws its own candidates; use it or verification "
            "(sample.verifier, sample.label_noise), not both"
        )
    if sample.get("curation_beta") is not None or (sample.get("curation_reward") or "model") != "model":
        raise ConfigError(
            "sample.curation_reward: verification selects the candidates itself; leave "
            "curation_reward=model and curation_beta=null"
        )


# -- the closed forms ------------------------------------------------------------------------------------


def p_star(p: float, keep_correct: float, keep_wrong: float) -> float:
    """Feng et al.'s proxy: the share of correct labels among the kept (p: the label error rate)."""
    kept = (1 - p) * keep_correct + p * keep_wrong
    return (1 - p) * keep_correct / kept if kept > 0 else math.nan


def kept_correct(p: float, keep_correct: float, keep_wrong: float, k: int) -> float:
    """The exact share of correct labels in S_t: the first kept of k candidates, else the first one."""
    q = (1 - p) * (1 - keep_correct) + p * (1 - keep_wrong)  # P(a candidate is dropped)
    fallback = (1 - p) * (1 - keep_correct) / q if q > 0 else 0.0  # P(correct | dropped): all k dropped
    return (1 - q**k) * p_star(p, keep_correct, keep_wrong) + q**k * fallback


def lda_gap(share: float, separation: float) -> float:
    """E of (mean of rows labelled 1 - mean of rows labelled 0) . u for a symmetric two-class mixture
    N(+-separation/2 u, I) whose labels are correct with probability `share`: (2 share - 1) separation.
    Its sign is the fitted linear classifier's side of the Bayes direction (Feng et al.'s breakdown)."""
    return (2 * share - 1) * separation


# -- the mechanism ----------------------------------------------------------------------------------------


class Verifier:
    """A run's label noise and verifier: built once by the sample pool, applied to S_t's candidates."""

    def __init__(self, name: str | None, noise: float, options: Any, classes: int, seed: int) -> None:
        self.name, self.noise, self.classes, self.seed = name, float(noise or 0), classes, seed
        self.options = read_options(name, options) if name is not None else {}

    def _uniform(
        self, t: int, purpose: str, chains: int, total: int, candidates: torch.Tensor
    ) -> torch.Tensor:
        """One uniform per chain and candidate of S_t (total of them), read at the given candidate indices."""
        g = seeding.generator(self.seed, t, purpose)
        return torch.rand(chains, total, generator=g, dtype=torch.float64)[:, candidates]

    def report(
        self, y: torch.Tensor, t: int, chains: int, total: int, candidates: torch.Tensor
    ) -> torch.Tensor:
        """The labels (C, m) the generator reports for candidates of classes y (m,): each, with probability
        label_noise, a uniformly drawn other class (one uniform per chain and candidate: whether, which)."""
        y = y.expand(chains, -1)
        if self.noise == 0:
            return y
        u = self._uniform(t, "label_noise", chains, total, candidates)
        flip = u < self.noise
        shift = 1 + (u / self.noise * (self.classes - 1)).floor().long().clamp_max(self.classes - 2)
        return torch.where(flip, (y + shift) % self.classes, y)

    def keep(
        self, x: torch.Tensor, y: torch.Tensor | None, t: int, rows: list[int] | range, k: int, n_draw: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One of each k consecutive candidates (rows `rows` of S_t; x (C, len(rows) k, ...), y their
        classes (len(rows) k,)), per chain: the first the verifier keeps, else the first; with its reported
        label, (C, len(rows))."""
        if y is None:
            raise ConfigError(
                "sample.verifier: labels are drawn by a class-conditional model only (num_classes)"
            )
        chains, total = x.shape[0], n_draw * k
        candidates = torch.tensor([i * k + j for i in rows for j in range(k)], dtype=torch.long)
        y = y.cpu()
        reported = self.report(y, t, chains, total, candidates)
        if self.name is None:  # label noise alone: every candidate passes (k = 1)
            kept = torch.ones(reported.shape, dtype=torch.bool)
        else:
            rate = torch.where(reported == y, self.options["keep_correct"], self.options["keep_wrong"])
            kept = self._uniform(t, "verifier", chains, total, candidates) < rate
        first = kept.view(chains, -1, k).double().argmax(-1)  # the first kept (0 when none is)
        index = torch.arange(len(rows)) * k + first  # (C, rows)
        return x[torch.arange(chains).unsqueeze(1), index.to(x.device)], reported.gather(1, index)
