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

`GaussianStatistics` is the Gaussian family's FitsStatistics capability (simulator.models.base), with
which simulator.loop runs model.path=statistics: the loop assembles D_t's statistics from the policy's
parts (simulator.samples.StatisticsPool) and computes the metrics in `METRICS` from statistics alone:

    nll, kl_truth   the model's log-density averaged over the test points is a function of the test
                    set's mean and scatter: the same value the sample path computes
    frechet, moments  functions of the mean and covariance of S_t's first n_eval rows, drawn exactly
    param_dist      parameters only

so every column is distributed as the sample path's. `StatisticsChains` is the same generation loop
without a run directory (`simulate_gaussian_statistics`: 10^4 chains x 200 generations in seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from simulator import seeding
from simulator.data.base import Dataset
from simulator.metrics.toy import frechet_distance
from simulator.metrics.toy import gaussian_stats as mean_and_cov
from simulator.models.base import OPTIONS_PREFIX, Diverged, FitsStatistics, check_temperature, psd_factor
from simulator.options import check_value, choose

F64 = torch.float64
POLICIES = ("replace", "mix", "fresh", "accumulate")
DDOF: dict[str, Any] = {"low": 0, "high": 1}  # the Gaussian family's rule for ddof (its OPTIONS too)
METRICS = ("nll", "kl_truth", "frechet", "moments", "param_dist")  # exact from statistics
SAMPLE_METRICS = ("frechet", "moments")  # these read S_t's statistics; the rest only G_t's parameters
LOG_2PI = math.log(2 * math.pi)


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


def draw_prefixes(
    sizes: Sequence[int], mean: torch.Tensor, factor: torch.Tensor, scale: float, generator: torch.Generator
) -> list[Stats]:
    """The statistics of the first `size` rows of one draw of N(mean, scale L L^T), for each of sizes.

    The draw is cut into blocks at the sizes: disjoint blocks are independent and drawn in order from the
    generator, and a prefix is the sum of its blocks, so the answers are nested as rows of one sample are.
    A size of 0 has the statistics of no points.
    """
    prefix, start, found = None, 0, {}
    for cut in sorted({c for c in sizes if c > 0}):
        block = draw_stats(cut - start, mean, factor, scale, generator)
        prefix, start = block if prefix is None else prefix + block, cut
        found[cut] = prefix
    empty = empty_stats(*mean.shape)
    return [found.get(size, empty) for size in sizes]


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


def params_vector(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """(C, d + d(d+1)/2): mean and covariance's lower triangle, as GaussianFamily.parameters_vector."""
    rows, cols = torch.tril_indices(mean.shape[1], mean.shape[1])
    return torch.cat([mean, cov[:, rows, cols]], dim=1)


def metrics_from_statistics(
    names: Sequence[str], chain: Any, evaluated: Stats | None, data: Dataset,
    params0: torch.Tensor | None, params_star: torch.Tensor | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The sample path's metric columns {name: (C,)} for a Gaussian with chain.mean (C, d) and chain.cov
    (C, d, d), from statistics alone: evaluated holds S_t's first n_eval rows' (None: no sample metric)."""
    test = data.test.reshape(data.test.shape[0], -1).to(F64)
    out: dict[str, torch.Tensor] = {}
    if "nll" in names or "kl_truth" in names:
        # -mean_i log p(y_i) = (d log 2 pi + log det S + tr(S^-1 M) / n) / 2, M = sum_i (y_i - mu)(y_i - mu)^T
        n, d = test.shape
        y = Stats.of(test.unsqueeze(0))
        delta = (y.mean - chain.mean).unsqueeze(-1)
        m = y.scatter + n * delta @ delta.transpose(1, 2)
        factor, info = torch.linalg.cholesky_ex(chain.cov)
        half = torch.linalg.solve_triangular(factor, m, upper=False)
        maha = torch.linalg.solve_triangular(factor, half.transpose(1, 2), upper=False)
        logdet = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        nll = 0.5 * (d * LOG_2PI + logdet + maha.diagonal(dim1=-2, dim2=-1).sum(-1) / n)
        nll = nll.masked_fill(info != 0, math.inf)  # a collapsed chain: log p = -inf, as log_prob says
        if "nll" in names:
            out.update(nll=nll, nll_bpd=nll / (d * math.log(2)))
        truth = data.truth
        if "kl_truth" in names and truth is not None and truth.log_prob is not None:
            out["kl_truth"] = truth.log_prob(data.test).double().mean().cpu() + nll
    if evaluated is not None and any(k in names for k in SAMPLE_METRICS):
        mu_t, cov_t = mean_and_cov(test)
        mu_s, cov_s = evaluated.mean, evaluated.scatter / (evaluated.count - 1)  # unbiased, as mean_and_cov
        if "frechet" in names:
            out["frechet"] = frechet_distance(mu_s, cov_s, mu_t, cov_t)
        if "moments" in names:
            out["mean_drift"] = (mu_s - mu_t).norm(dim=-1)
            out["cov_drift"] = (cov_s - cov_t).flatten(1).norm(dim=-1)
            out["var_ratio"] = cov_s.diagonal(dim1=-2, dim2=-1).sum(-1) / cov_t.trace()
    if "param_dist" in names:
        theta = params_vector(chain.mean, chain.cov)
        for name, ref in (("param_dist0", params0), ("param_dist_star", params_star)):
            if ref is not None:
                out[name] = (theta - ref.to(F64)).norm(dim=-1)
    return out


class GaussianStatistics(FitsStatistics):
    """The Gaussian family's FitsStatistics capability (simulator.models.base; model.path=statistics): its
    closed-form fit sees the data only through their mean and scatter, so generation t draws those (Stats),
    never the points. After fit_statistics the parameters are float64 (the statistics' precision) and a
    Cholesky root of the covariance comes from the statistics' own root where they carry one; state_dict()
    casts them to the family's dtype for the model file, statistics_state() keeps them exact."""

    statistics_metrics = METRICS
    sample_statistics_metrics = SAMPLE_METRICS
    chains: int
    dim: int
    ddof: int
    mean: torch.Tensor | None
    cov: torch.Tensor | None
    _factor: torch.Tensor | None
    _degenerate: torch.Tensor | None

    def _shared(self, stats: Stats) -> Stats:
        """stats of one set shared by every chain, as C chains' (views, no copies)."""
        if stats.mean.shape[0] == self.chains:
            return stats
        c, d = self.chains, stats.mean.shape[1]
        return Stats(stats.count, stats.mean.expand(c, d), stats.scatter.expand(c, d, d))

    def statistics_of(self, x: torch.Tensor) -> Stats:
        """The statistics of points x (C or 1, n, *event), one per chain, in float64."""
        return self._shared(Stats.of(x.reshape(x.shape[0], x.shape[1], -1)))

    def truth_statistics(self, truth: Any, n: int, generator: torch.Generator) -> Stats:
        """The statistics of n new points per chain of a Gaussian truth (params mean (d,), cov (d, d))."""
        params = getattr(truth, "params", None) or {}
        if "mean" not in params or "cov" not in params:
            raise ValueError("truth statistics need a Gaussian truth (data=gaussian: params mean and cov)")
        c, d = self.chains, self.dim
        mean, cov = params["mean"].to(F64).expand(c, d), params["cov"].to(F64).expand(c, d, d)
        return draw_stats(int(n), mean, psd_factor(cov)[0], 1.0, generator)

    def load_statistics(self, state: dict[str, Any]) -> Stats:
        return Stats.from_dict(state)

    def fit_statistics(self, stats: Stats) -> dict[str, Any]:
        """The closed-form fit to the points stats summarises (as GaussianFamily.fit, in float64)."""
        self.mean, self.cov, self._factor = fit(stats, self.ddof)
        self._degenerate = None  # log_prob finds it when asked (it costs a factorisation)
        return {"log_likelihood": float(log_likelihood(self.cov, stats.count, self.ddof).mean())}

    def sample_statistics(
        self, sizes: Sequence[int], *, generator: torch.Generator, temperature: float = 1.0
    ) -> list[Stats]:
        """The statistics of the first `size` rows of one draw of N(mu, s Sigma), for each of sizes."""
        if self.mean is None or self._factor is None:
            raise RuntimeError("GaussianFamily has no parameters yet: call fit_statistics() first")
        return draw_prefixes(sizes, self.mean, self._factor, check_temperature(temperature), generator)

    def statistics_state(self) -> dict[str, torch.Tensor]:
        if self.mean is None or self.cov is None or self._factor is None:
            raise RuntimeError("GaussianFamily has no parameters yet: call fit_statistics() first")
        return {"mean": self.mean, "cov": self.cov, "factor": self._factor}

    def load_statistics_state(self, state: dict[str, Any]) -> None:
        """Parameters from statistics_state(), or a model file's mean and cov (a root is then computed)."""
        c, d = self.chains, self.dim
        self.mean, self.cov = state["mean"].to(F64).expand(c, d), state["cov"].to(F64).expand(c, d, d)
        factor = state.get("factor")
        self._factor = psd_factor(self.cov)[0] if factor is None else factor.to(F64)
        self._degenerate = None

    def metrics_from_statistics(
        self, names: Sequence[str], evaluated: Stats | None, data: Dataset,
        params0: torch.Tensor | None, params_star: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        return metrics_from_statistics(names, self, evaluated, data, params0, params_star)


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
        check_value(f"{OPTIONS_PREFIX}.ddof", int, ddof, **DDOF)  # the Gaussian family's rule for ddof
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
        g = seeding.generator(self.seed, t, "sample")
        sizes = [self.n_syn, *([self.n_eval] if self.n_eval else [])]
        drawn = draw_prefixes(sizes, self.mean, self.factor, self.temperature, g)
        self.syn = drawn[0]
        return drawn[1] if self.n_eval else None


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
