"""Gaussian chains at the speed of their statistics: the fitted mean and scatter drawn, not the samples.

The Gaussian family sees its n training points only through their mean and scatter matrix, and for
n i.i.d. draws of N(mu, s Sigma) those have known laws: the mean is N(mu, s Sigma / n), the scatter
is Wishart(n - 1, s Sigma) (drawn by the Bartlett decomposition), and the two are independent. Drawing
them directly costs O(C d^2) per generation whatever n is, instead of the O(C n d) of the samples.
Pooled sets (real data plus samples, or every earlier generation's samples) combine by the
parallel-axis formula, so the result is the sample path's in distribution, exactly (not draw for draw):

    replace      D_t = the first n_syn rows of S_{t-1}
    mix          the fixed real set plus round(lam n) rows of S_{t-1} (Bertrand et al.)
    fresh        k new real points from the truth (a Gaussian) plus n_syn rows of S_{t-1}
    accumulate   the real set and the first n_syn rows of every S_0 .. S_{t-1} (Gerstgrasser et al.)

at any sampling temperature s (S_t drawn from N(mu_t, s Sigma_t); the real data are never tempered)
and ddof 0 or 1. Not exact, so not offered: fresh draws from a fixed real set and
accumulate_subsample (a random subset of fixed points depends on the points, not only on their
statistics), and curation (it needs each sample's reward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from simulator import seeding
from simulator.models.base import OPTIONS_PREFIX, Diverged, check_temperature
from simulator.models.gaussian import GaussianFamily, psd_factor
from simulator.options import check_call, choose

F64 = torch.float64
POLICIES = ("replace", "mix", "fresh", "accumulate")


@dataclass(frozen=True)
class Stats:
    """Sufficient statistics of `count` points per chain: their mean (C, d) and scatter (C, d, d).

    root, when known, is a lower-triangular (C, d, d) with root root^T = scatter (a Bartlett draw
    comes with one), so that fitting it needs no Cholesky factorisation.
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor
    root: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor) -> Stats:
        """The statistics of points x (C, n, d), in float64."""
        x = x.to(F64)
        mean = x.mean(1)
        xc = x - mean.unsqueeze(1)
        return cls(x.shape[1], mean, xc.transpose(1, 2) @ xc)

    def __add__(self, other: Stats) -> Stats:
        """The statistics of the union of two disjoint sets (the parallel-axis formula)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        outer = delta.unsqueeze(-1) * delta.unsqueeze(-2)
        return Stats(n, mean, self.scatter + other.scatter + outer * (self.count * other.count / n))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "mean": self.mean, "scatter": self.scatter}
        return out if self.root is None else {**out, "root": self.root}

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        root = d.get("root")
        return cls(
            int(d["count"]), d["mean"].to(F64), d["scatter"].to(F64), None if root is None else root.to(F64)
        )


def empty_stats(chains: int, dim: int) -> Stats:
    """The statistics of no points."""
    return Stats(0, torch.zeros(chains, dim, dtype=F64), torch.zeros(chains, dim, dim, dtype=F64))


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=F64, device=generator.device).cpu()


def bartlett(dof: int, factor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L A (C, d, d), lower-triangular, with (L A)(L A)^T ~ Wishart(dof, L L^T); L = factor, dof >= d.

    Bartlett: A is lower-triangular with A_ij ~ N(0, 1) below the diagonal and A_ii^2 ~ chi^2 with
    dof - i + 1 degrees of freedom for i = 1..d (dof - i for the 0-based i below), all independent.
    Exact for a singular L too: the product is then Wishart of the singular L L^T.
    """
    chains, d, _ = factor.shape
    if dof < d:
        raise ValueError(f"the Bartlett decomposition needs dof >= d, got dof={dof}, d={d}")
    half_dof = (dof - torch.arange(d, dtype=F64)) / 2  # chi^2_k = 2 Gamma(k / 2, 1)
    alpha = half_dof.expand(chains, d).contiguous().to(generator.device)
    chi2 = 2 * torch._standard_gamma(alpha, generator=generator).cpu()
    a = torch.diag_embed(chi2.sqrt())
    if d > 1:
        rows, cols = torch.tril_indices(d, d, offset=-1)
        a[:, rows, cols] = _randn((chains, len(rows)), generator)
    return factor @ a


def draw_stats(
    m: int, mean: torch.Tensor, factor: torch.Tensor, scale: float, generator: torch.Generator
) -> Stats:
    """The statistics of m i.i.d. points of N(mean, scale L L^T) per chain, without drawing the points.

    mean (C, d), factor L (C, d, d). Fewer than d + 1 points have a singular scatter, which Bartlett
    does not cover: those (at most d points) are drawn themselves, which is as exact and as cheap.
    """
    chains, d = mean.shape
    if m == 0:
        return empty_stats(chains, d)
    root = math.sqrt(scale)
    if m <= d:
        z = _randn((chains, m, d), generator)
        return Stats.of(mean.unsqueeze(1) + root * z @ factor.transpose(1, 2))
    z = _randn((chains, d, 1), generator)
    xbar = mean + (root / math.sqrt(m)) * (factor @ z).squeeze(-1)
    la = bartlett(m - 1, factor, generator) * root
    return Stats(m, xbar, la @ la.transpose(1, 2), la)


def fit(stats: Stats, ddof: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gaussian family's closed-form fit from statistics: mean, scatter / (n - ddof), and a
    lower-triangular factor of that covariance (from the statistics' root when they carry one)."""
    if stats.count <= ddof:
        raise ValueError(f"need more than {ddof} points per chain, got {stats.count}")
    mean, cov = stats.mean, stats.scatter / (stats.count - ddof)
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise Diverged("non-finite Gaussian parameters")
    factor = psd_factor(cov)[0] if stats.root is None else stats.root / math.sqrt(stats.count - ddof)
    return mean, cov, factor


def log_likelihood(cov: torch.Tensor, count: int, ddof: int) -> torch.Tensor:
    """Mean training log-likelihood (C,) of the fit, the closed form GaussianFamily.fit reports."""
    d = cov.shape[-1]
    logdet = torch.linalg.slogdet(cov).logabsdet
    return -0.5 * (d * math.log(2 * math.pi) + logdet + d * (count - ddof) / count)


class StatisticsChains:
    """The Gaussian family's generation loop on statistics: C chains; generation t is fit(t), draw(t).

    real: the statistics of the real training set (every chain's own, or shared). n_syn: the rows of
    S_{t-1} that enter D_t (mix: round(lam n)). n_eval: besides those, the first n_eval rows of S_t
    whose statistics draw() also returns (what the sample path's metrics see; None: none).
    fresh_n and truth (mean (d,), cov (d, d)): policy fresh draws fresh_n new real points of the
    truth each generation. init: G_0's (mean, cov) instead of the fit to the real data.
    Randomness: S_t from seeding.generator(seed, t, "sample"), fresh data from (seed, t, "policy").
    """

    def __init__(
        self, policy: str, real: Stats, *, n_syn: int, ddof: int = 0, temperature: float = 1.0,
        n_eval: int | None = None, fresh_n: int | None = None,
        truth: tuple[torch.Tensor, torch.Tensor] | None = None,
        init: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        choose("policy.name", policy, POLICIES)  # the policies whose training set statistics determine
        check_call(OPTIONS_PREFIX, GaussianFamily, ddof=ddof)  # the Gaussian family's rule for ddof
        check_temperature(temperature)
        if policy == "fresh" and (truth is None or not fresh_n or fresh_n < 1):
            raise ValueError("fresh on statistics needs the Gaussian truth and fresh_n >= 1 new points")
        self.policy, self.real, self.n_syn, self.ddof = policy, real, int(n_syn), int(ddof)
        self.temperature, self.n_eval, self.seed, self.init = float(temperature), n_eval, seed, init
        self.fresh_n = fresh_n
        self.truth = None  # (mean (C, d), factor (C, d, d)) of the truth, for fresh draws
        if truth is not None:
            t_mean, t_cov = (v.to(F64) for v in truth)
            self.truth = (t_mean.expand_as(real.mean), psd_factor(t_cov.expand_as(real.scatter))[0])
        # G_t's parameters (C, d), (C, d, d), a root of cov
        self.mean: torch.Tensor | None = None
        self.cov: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        self.syn: Stats | None = None  # the first n_syn rows of S_t
        self.pool: Stats | None = None  # accumulate: D_t, the real set and S_0..S_{t-1}'s rows

    # the state after generation t: enough to continue at t + 1 exactly (a resume)
    def state_dict(self) -> dict:
        out = {"mean": self.mean, "cov": self.cov, "factor": self.factor, "syn": self.syn.to_dict()}
        return out if self.pool is None else {**out, "pool": self.pool.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.cov, self.factor = (state[k].to(F64) for k in ("mean", "cov", "factor"))
        self.syn = Stats.from_dict(state["syn"])
        self.pool = Stats.from_dict(state["pool"]) if "pool" in state else None

    def training_set(self, t: int) -> Stats:
        """The statistics of D_t (generation t >= 1), from S_{t-1}'s rows and the policy."""
        if self.policy == "replace":
            return self.syn
        if self.policy == "mix":
            return self.real + self.syn
        if self.policy == "fresh":
            g = seeding.generator(self.seed, t, "policy")
            return draw_stats(self.fresh_n, *self.truth, 1.0, g) + self.syn
        self.pool = (self.real if self.pool is None else self.pool) + self.syn  # accumulate
        return self.pool

    def fit(self, t: int) -> int:
        """Fit G_t: to the real set (t = 0; or take init), else to D_t. Returns |D_t| (0 for init)."""
        if t == 0 and self.init is not None:
            self.mean, self.cov = (v.to(F64) for v in self.init)
            self.factor, self.pool = psd_factor(self.cov)[0], None
            return 0
        train = self.real if t == 0 else self.training_set(t)
        self.mean, self.cov, self.factor = fit(train, self.ddof)
        return train.count

    def draw(self, t: int) -> Stats | None:
        """Draw S_t's statistics (kept for D_{t+1}); returns those of its first n_eval rows (or None)."""
        # S_t in blocks cut at n_syn and n_eval: disjoint blocks are independent, prefixes are sums
        cuts = sorted({c for c in (self.n_syn, self.n_eval or 0) if c > 0})
        g = seeding.generator(self.seed, t, "sample")
        prefix, start, self.syn, evaluated = None, 0, empty_stats(*self.mean.shape), None
        for cut in cuts:
            block = draw_stats(cut - start, self.mean, self.factor, self.temperature, g)
            prefix, start = block if prefix is None else prefix + block, cut
            if cut == self.n_syn:
                self.syn = prefix
            if cut == self.n_eval:
                evaluated = prefix
        return evaluated


def simulate_gaussian_statistics(
    policy: str,
    n: int,
    generations: int,
    chains: int,
    mu0: torch.Tensor,
    Sigma0: torch.Tensor,
    *,
    lam: float = 0.5,  # mix: round(lam n) samples join the n real points
    n_syn: int | None = None,  # samples of G_{t-1} in D_t (default n; fresh: fresh_n; mix: from lam)
    fresh_n: int | None = None,  # fresh: new real points per generation (default n // 2, as policy=fresh)
    ddof: int = 0,  # 0: maximum likelihood, 1: unbiased covariance
    temperature: float = 1.0,  # S_t ~ N(mu_t, s Sigma_t)
    init: tuple[torch.Tensor, torch.Tensor] | None = None,  # G_0's (mean, cov) instead of the real fit
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Generations 0..T of C chains from the truth N(mu0, Sigma0) with n real points per chain.

    Returns {"mean": (T+1, C, d), "cov": (T+1, C, d, d)} in float64: G_t's parameters, distributed
    as the Gaussian family's generation loop would fit them; and "real_mean" (C, d), the mean of each
    chain's real set (mu*, the optimum that mix contracts to). The real set's statistics are drawn
    from the truth as well (generator (seed, "data")), so n = 10^6 costs what n = 100 does.
    """
    mu0, Sigma0 = torch.as_tensor(mu0, dtype=F64).reshape(-1), torch.as_tensor(Sigma0, dtype=F64)
    d = mu0.shape[0]
    if Sigma0.shape != (d, d) or n < 1 or generations < 0 or chains < 1:
        raise ValueError(f"need Sigma0 ({d}, {d}), n >= 1, generations >= 0, chains >= 1")
    factor0 = psd_factor(Sigma0.expand(chains, d, d))[0]
    real = draw_stats(n, mu0.expand(chains, d), factor0, 1.0, seeding.generator(seed, "data"))
    if policy == "mix":
        n_syn = round(lam * n)
    elif policy == "fresh":
        fresh_n = fresh_n or max(n // 2, 1)
        n_syn = fresh_n if n_syn is None else n_syn
    n_syn = n if n_syn is None else n_syn
    chain = StatisticsChains(policy, real, n_syn=n_syn, ddof=ddof, temperature=temperature,
                             fresh_n=fresh_n, truth=(mu0, Sigma0), init=init, seed=seed)  # fmt: skip
    means = torch.empty(generations + 1, chains, d, dtype=F64)
    covs = torch.empty(generations + 1, chains, d, d, dtype=F64)
    for t in range(generations + 1):
        chain.fit(t)
        chain.draw(t)
        means[t], covs[t] = chain.mean, chain.cov
    return {"mean": means, "cov": covs, "real_mean": real.mean}
