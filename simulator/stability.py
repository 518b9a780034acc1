"""Theory of self-consuming retraining, and the same quantities measured from a run's rows.

Closed forms (docs/science.md) for the Gaussian family under replace / accumulate / mix, the
sufficient stability condition of Bertrand et al. (ICLR 2024), and a fitted contraction rate with
a verdict, so that a measured trajectory can be set against the theory. numpy/scipy only.

Conventions (docs/science.md): generation 0 is the truth N(mu_0, Sigma_0); fit t uses n i.i.d. samples
of model t-1 (fit 1 uses the real data); a = (n-1)/n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from simulator.stats import student_t_interval


def c4(n: ArrayLike) -> np.ndarray:
    """E[S]/sigma for the unbiased sample standard deviation S of n normals, to full precision for any n.

    Gamma(n/2)/Gamma((n-1)/2) is the Pochhammer symbol ((n-1)/2)_{1/2}; scipy's poch keeps full
    relative precision where a difference of gammaln values loses ~1e-10 at n = 1e5.
    """
    n = np.asarray(n, dtype=float)
    return np.sqrt(2.0 / (n - 1.0)) * special.poch((n - 1.0) / 2.0, 0.5)


def accumulate_limit(n: float) -> float:
    """lim E[tr Sigma_t]/tr Sigma_0 under accumulate: prod_k (1 - 1/(k^2 n)) = sin(pi/sqrt n)/(pi/sqrt n)."""
    x = math.pi / math.sqrt(n)
    return math.sin(x) / x


def _fit_scales(t_max: int, temperature: float, tempered_real: bool) -> np.ndarray:
    """s_k for fits k = 1..t_max: the covariance scale of the draw that fit k sees (index 0 unused)."""
    s = np.full(t_max + 1, float(temperature))
    if t_max >= 1 and not tempered_real:
        s[1] = 1.0  # the loop's convention: real data are never tempered
    s[0] = 1.0
    return s


def gaussian_expected(
    policy: str,
    n: int,
    t: ArrayLike,
    *,
    d: int = 1,
    ddof: int = 0,
    temperature: float = 1.0,
    lam: float | None = None,
    tempered_real: bool = True,
) -> dict[str, np.ndarray]:
    """Exact expected trajectories of the Gaussian family at generations t (arrays shaped like t).

    Keys (ratios to generation 0, so they do not depend on mu_0 or Sigma_0):
      var_ratio        E[tr Sigma_t] / tr Sigma_0                      (replace, accumulate)
      mean_sq_per_var  E||mu_t - mu_0||^2 / tr Sigma_0                 (replace, accumulate)
                       -- normalised by the trace, so in d = 1 it is E[(mu_t - mu_0)^2] / sigma_0^2
      det_ratio        E[det Sigma_t] / det Sigma_0                    (replace)
      log_det_shift    E[log det Sigma_t] - log det Sigma_0            (replace)
      sigma_ratio      E[sigma_t] / sigma_0                            (replace, d = 1)
      log_var_shift    E[log sigma_t^2] - log sigma_0^2                (replace, d = 1)
      w2_sq            E[W2^2(N(mu_t, sigma_t^2), N(mu_0, sigma_0^2))] / sigma_0^2  (replace, d = 1)
      mean_error_ratio E[mu_t - mu*] / (mu_0 - mu*)                    (mix; mu* = real-data mean)
      rho              the per-generation contraction of mean_error_ratio      (mix)
    replace: fit on n samples of the previous model, ddof 0 (MLE) or 1 (unbiased), drawn at
    temperature s (covariance s Sigma). accumulate: pooled MLE (ddof 0) over all n t points so
    far. mix(lam): n real points plus m = round(lam n) samples of the previous model, ddof 0, so
    rho = m / (n + m), which is lam / (1 + lam) only when lam n is an integer; exact for the expected mean
    (the covariance's expected error contracts by rho (n + m - 1)/(n + m), rho to first order in 1/n;
    docs/science.md). The model of generation 0 is the perturbed start.
    tempered_real: docs/science.md's convention draws fit 1's data from the truth at temperature s too
    (E[Sigma_t] = s^t Sigma_0); False keeps the real data untempered, as in the generation loop.
    """
    ts = np.asarray(t)
    if ts.size and (np.any(ts < 0) or np.any(ts != np.round(ts))):
        raise ValueError(f"generations must be non-negative integers, got {t!r}")
    ts = ts.astype(int)
    if n < 2 or d < 1 or ddof not in (0, 1) or not temperature > 0:
        raise ValueError(
            f"need n >= 2, d >= 1, ddof in (0, 1), temperature > 0; got {n}, {d}, {ddof}, {temperature}"
        )
    t_max = int(ts.max()) if ts.size else 0
    s = _fit_scales(t_max, temperature, tempered_real)
    k = np.arange(t_max + 1, dtype=float)

    if policy == "replace":
        if n <= d:
            raise ValueError(f"replace needs n > d for a non-singular covariance, got n={n}, d={d}")
        shrink = (n - 1.0) / n if ddof == 0 else 1.0
        var = np.cumprod(np.where(k > 0, s * shrink, 1.0))
        # E||mu_k - mu_{k-1}||^2 = s_k E[tr Sigma_{k-1}] / n, and the increments are uncorrelated.
        mean_sq = np.concatenate([[0.0], np.cumsum(s[1:] * var[:-1] / n)])
        i = np.arange(1, d + 1)
        det_step = np.prod((n - i) / (n - ddof))  # E det of a scaled Wishart, one fit
        det = np.cumprod(np.where(k > 0, s**d * det_step, 1.0))
        logdet_step = np.sum(special.digamma((n - i) / 2.0)) + d * math.log(2.0 / (n - ddof))
        logdet = np.cumsum(np.where(k > 0, d * np.log(s) + logdet_step, 0.0))
        out = {"var_ratio": var, "mean_sq_per_var": mean_sq, "det_ratio": det, "log_det_shift": logdet}
        if d == 1:
            step = float(c4(n)) * math.sqrt(shrink)
            sigma = np.cumprod(np.where(k > 0, np.sqrt(s) * step, 1.0))
            out.update(
                sigma_ratio=sigma,
                log_var_shift=logdet,
                # W2^2 between 1-D Gaussians = (mu_t - mu_0)^2 + (sigma_t - sigma_0)^2.
                w2_sq=mean_sq + var - 2.0 * sigma + 1.0,
            )
    elif policy == "accumulate":
        if ddof != 0:
            raise ValueError("the accumulate closed form is for the pooled maximum-likelihood fit (ddof 0)")
        # Pooling n fresh points with the (k-1) n old ones: E[V_k] = V_{k-1} ((k-1) n + s (n - 1/k)) / (k n)
        kk = np.maximum(k, 1.0)
        step = ((kk - 1.0) * n + s * (n - 1.0 + (kk - 1.0) / kk)) / (kk * n)
        var = np.cumprod(np.where(k > 0, step, 1.0))
        # mu_k - mu_{k-1} = (mean of the new draw - mu_{k-1}) / k.
        mean_sq = np.concatenate([[0.0], np.cumsum(s[1:] * var[:-1] / (n * k[1:] ** 2))])
        out = {"var_ratio": var, "mean_sq_per_var": mean_sq}
    elif policy == "mix":
        if lam is None or lam < 0:
            raise ValueError(f"mix needs lam >= 0, got {lam}")
        m = round(lam * n)  # Python's round, as the mix policy uses
        rho = m / (n + m)
        out = {"mean_error_ratio": rho**k, "rho": np.full_like(k, rho)}
    else:
        raise ValueError(f"unknown policy {policy!r}; known: replace, accumulate, mix")
    return {key: val[ts] for key, val in out.items()}


def golden_ratio_stationary(
    w: ArrayLike, n: int, m: int, sigma2: float = 1.0, *, known_sigma: bool = False, ddof: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stationary E[(mu_t - mu)^2] per coordinate, and E[Sigma_t], of the weighted fresh-data Gaussian loop.

    Each generation fits mu_t = w mean(n fresh real rows) + (1 - w) mean(m samples of G_{t-1}),
    G_{t-1} = N(mu_{t-1}, Sigma_{t-1}) (He, Xu and Cheng 2025; policy=fresh policy.source=truth);
    derivation in experiments/golden_ratio/README.md. Every form is exact at finite n and m, and all
    share V w (2 - w) = w^2 sigma2/n + (1 - w)^2 S/m with S = E[Sigma_t]:
      known_sigma  S = sigma2 (their setting): V = sigma2 (w^2/n + (1-w)^2/m) / (w (2-w)), minimised at
                   w = 1/phi when n = m.
      ddof 0       Sigma_t the weighted maximum-likelihood variance (the gaussian family's default):
                   S (w m + (1-w)^2) / m = w sigma2 (n - w)/n + w (1 - w) V, so S < sigma2.
      ddof 1       Sigma_t divided by Kish's 1 - sum p_i^2 = 1 - w^2/n - (1-w)^2/m:
                   S = sigma2 + (1 - w) n V / (n - w) > sigma2, so
                   V = sigma2 (w^2/n + (1-w)^2/m) / (w (2-w) - (1-w)^3 n / (m (n - w))).
                   Below the w where that denominator is 0 (about 1/(2m)) the second moments grow without
                   bound (the linear recursion's spectral radius passes 1): V = S = inf there.
    At n = m = 10 the argmin is 0.6180 (known sigma), 0.6073 (ddof 0), 0.6239 (ddof 1).
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    w = np.asarray(w, dtype=float)
    if known_sigma:
        return sigma2 * (w**2 / n + (1 - w) ** 2 / m) / (w * (2 - w)), np.full_like(w, sigma2)
    if ddof == 1:
        den = w * (2 - w) - (1 - w) ** 3 * n / (m * (n - w))
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(den > 0, sigma2 * (w**2 / n + (1 - w) ** 2 / m) / den, np.inf)
        return v, np.where(den > 0, sigma2 + (1 - w) * n * v / (n - w), np.inf)
    den = w * m + (1 - w) ** 2
    a = m * w * sigma2 * (n - w) / (n * den)  # S = a + b V
    b = m * w * (1 - w) / den
    v = (w**2 * sigma2 / n + (1 - w) ** 2 * a / m) / (w * (2 - w) - (1 - w) ** 2 * b / m)
    return v, a + b * v


def bertrand_condition(lam: float, L: float = 0.0, eps: float = 0.0, alpha: float = 1.0) -> dict[str, Any]:
    """Bertrand et al.'s sufficient condition lam (1 + L eps/alpha) < 1/2 and the rate rho it guarantees."""
    if lam < 0 or L < 0 or eps < 0 or not alpha > 0:
        raise ValueError(f"need lam, L, eps >= 0 and alpha > 0; got {lam}, {L}, {eps}, {alpha}")
    lhs = lam * (1.0 + L * eps / alpha)
    holds = lhs < 0.5
    b = lam * (alpha + eps * L)
    return {"holds": bool(holds), "lhs": float(lhs), "rho": float(b / (alpha - b)) if holds else None}


def _usable(errors: ArrayLike, generations: ArrayLike | None, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Generations >= start with finite, positive errors (what a log-linear fit can use)."""
    e = np.asarray(errors, dtype=float)
    g = np.arange(len(e), dtype=float) if generations is None else np.asarray(generations, dtype=float)
    keep = (g >= start) & np.isfinite(e) & (e > 0)
    return g[keep], e[keep]


def contraction_rate(
    errors: Sequence[float] | np.ndarray,
    start: int = 1,
    *,
    generations: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """Least-squares fit log(error_t) = a + t log(rho) over generations t >= start, with a 95% interval.

    errors[i] belongs to generation generations[i] (default i); non-positive or non-finite errors are
    skipped. The interval is exp(slope +- t_{0.975, k-2} SE) from the regression's standard error; it
    is nan with fewer than 3 points (and rho too with fewer than 2).
    """
    x, e = _usable(errors, generations, start)
    nan = float("nan")
    if len(x) < 2 or np.ptp(x) == 0:
        return {"rho": nan, "rho_low": nan, "rho_high": nan, "log_intercept": nan}
    y = np.log(e)
    xc = x - x.mean()
    sxx = float(np.sum(xc**2))
    slope = float(np.sum(xc * (y - y.mean())) / sxx)
    intercept = float(y.mean() - slope * x.mean())
    half = nan
    if len(x) > 2:
        resid = y - intercept - slope * x
        se = math.sqrt(float(np.sum(resid**2)) / (len(x) - 2) / sxx)
        half = float(stats.t.ppf(0.975, len(x) - 2)) * se
    return {
        "rho": math.exp(slope),
        "rho_low": math.exp(slope - half),
        "rho_high": math.exp(slope + half),
        "log_intercept": intercept,
    }


def verdict(
    errors: Sequence[float] | np.ndarray,
    *,
    rho_fit: dict[str, float] | None = None,
    tol: float = 0.25,
    start: int = 1,
    generations: Sequence[float] | np.ndarray | None = None,
) -> str:
    """'converging', 'bounded' or 'diverging' for an error trajectory (generations >= start).

    Rule: any +inf error (a diverged generation) is 'diverging'. Otherwise, with the usable errors
    split into thirds, the run is 'diverging' when the fitted rate is significantly above 1
    (rho_low > 1) and the last third's mean exceeds the first third's by more than a factor 1 + tol;
    'converging' when rho is significantly below 1 (rho_high < 1) and the last third's mean is
    below (1 - tol) times the first third's; 'bounded' otherwise, including runs with fewer than 3
    usable points (no evidence of a trend). Requiring both a significant rate and a real change
    keeps noise around a plateau (the finite-sample floor of mixed retraining) from being called a
    trend, and keeps a tiny but significant drift from being called divergence.
    """
    raw = np.asarray(errors, dtype=float)
    if np.any(np.isposinf(raw)):
        return "diverging"
    _, e = _usable(raw, generations, start)
    if len(e) < 3:
        return "bounded"
    fit = rho_fit if rho_fit is not None else contraction_rate(raw, start, generations=generations)
    third = math.ceil(len(e) / 3)
    first, last = float(e[:third].mean()), float(e[-third:].mean())
    if fit["rho_low"] > 1.0 and last > (1.0 + tol) * first:
        return "diverging"
    if fit["rho_high"] < 1.0 and last < (1.0 - tol) * first:
        return "converging"
    return "bounded"


def t_interval(values: ArrayLike, level: float = 0.95) -> dict[str, float]:
    """Mean of the finite values with its Student-t interval (simulator.stats.student_t_interval):
    mean +- t_{(1+level)/2, k-1} s / sqrt(k) over k finite values (t_{0.975} = 12.7, 4.3, 3.2 for
    k = 2, 3, 4: 2.2 to 6.5 times the normal 1.96). half is nan for k < 2 (no interval from one value).
    """
    mean, half, k = student_t_interval(np.asarray(values, dtype=float).reshape(-1).tolist(), level)
    half = half if k > 1 else math.nan
    return {"mean": mean, "half": half, "low": mean - half, "high": mean + half, "n": k}


def _excess(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    """Per-generation excess of values over reference (same shape): log ratio when both are positive,
    else the difference relative to the reference's mean magnitude. Returns (excess, scale)."""
    if np.all(values > 0) and np.all(reference > 0):
        return np.log(values) - np.log(reference), "log"
    return (values - reference) / max(float(np.mean(np.abs(reference))), 1e-12), "relative"


def regime_verdict(
    chains: Sequence[Sequence[float]],
    *,
    floor: Sequence[Sequence[float]] | None = None,
    diverged: Sequence[bool] | None = None,
    generations: Sequence[int] | None = None,
    tol: float = 0.25,
    spike: float = 10.0,
) -> dict[str, Any]:
    """Verdict of one regime over its chains (seeds): is its error over the reference growing?

    chains[s][i] is the error of chain s at generations[i] (default 0..T); floor[s] is the paired
    real-only run of the same seed (lambda = 0: the finite-sample floor), or None to compare each
    chain with its own generation 0. A chain whose run diverged (diverged[s]) or whose error is
    non-finite anywhere is a diverged chain. For the others the excess e_s(t) = log(error / reference)
    (see _excess) gets a least-squares slope per chain; the slopes' Student-t 95% interval over chains
    and the change over the run (the factor exp(mean slope x span of generations), with the interval
    of the slope carried over) give the verdict:

      diverging     a chain diverged, or the change is significantly > 1 (its interval above 1) and
                    larger than 1 + tol
      converging    the change is significantly < 1 and smaller than 1 / (1 + tol)
      unstable      no such trend, but some chain spiked: its excess at one generation exceeded its
                    neighbours' by more than a factor `spike` (an error 10x the generations around it)
      bounded       the whole interval of the change lies within [1 / (1 + tol), 1 + tol]: the excess
                    is shown not to move by more than tol over the run (at whatever level: excess_last)
      inconclusive  none of these: the interval is too wide to tell (few seeds, noisy chains)

    With one chain the slope's interval is the regression's own (t with T - 1 degrees of freedom).
    Returned: verdict, chains, finite (chains without a non-finite error), diverged_fraction, slope
    (per generation) with its interval, rising (finite chains whose slope is > 0), change (the fitted
    factor over the run, mean slope x span) with its interval, excess_last (mean excess over the last
    third of generations) with its interval, peak (largest excess factor), scale.
    """
    gens = np.arange(len(chains[0]), dtype=float) if generations is None else np.asarray(generations, float)
    errors = np.asarray(chains, dtype=float)
    ref = None if floor is None else np.asarray(floor, dtype=float)
    flags = np.zeros(len(errors), bool) if diverged is None else np.asarray(diverged, bool)
    bad = flags | ~np.isfinite(errors).all(axis=1)
    if ref is not None:  # a chain whose floor is missing or non-finite cannot be compared: left out
        keep = np.isfinite(ref).all(axis=1)
    else:
        keep = np.ones(len(errors), bool)
    good = ~bad & keep
    nan, spiked = math.nan, False
    out: dict[str, Any] = {
        "chains": int(len(errors)), "finite": int((~bad).sum()), "diverged_fraction": float(bad.mean()),
        "slope": nan, "slope_low": nan, "slope_high": nan, "rising": 0,
        "change": nan, "change_low": nan, "change_high": nan,
        "excess_last": nan, "excess_last_low": nan, "excess_last_high": nan, "peak": nan, "scale": None,
    }  # fmt: skip
    if good.any():
        e, scale = _excess(errors[good], ref[good] if ref is not None else errors[good][:, :1])
        xc = gens - gens.mean()
        slopes = (e - e.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
        third = max(1, math.ceil(len(gens) / 3))
        level = t_interval(e[:, -third:].mean(axis=1))
        if len(slopes) > 1:
            ci = t_interval(slopes)
            low, high = ci["low"], ci["high"]
        else:  # one chain: the regression's own interval over its generations
            resid = e[0] - e[0].mean() - slopes[0] * xc
            dof = len(gens) - 2
            se = math.sqrt(float(resid @ resid) / dof / float(xc @ xc)) if dof > 0 else nan
            half = float(stats.t.ppf(0.975, dof)) * se if dof > 0 else nan
            low, high = slopes[0] - half, slopes[0] + half
        unit = (lambda x: math.exp(x)) if scale == "log" else (lambda x: 1.0 + x)
        span = float(np.ptp(gens))
        out.update(
            slope=float(slopes.mean()), slope_low=float(low), slope_high=float(high), scale=scale,
            rising=int((slopes > 0).sum()), change=unit(float(slopes.mean()) * span),
            change_low=unit(float(low) * span), change_high=unit(float(high) * span),
            excess_last=unit(level["mean"]), excess_last_low=unit(level["low"]),
            excess_last_high=unit(level["high"]),
            peak=unit(float(e.max())),
        )  # fmt: skip
        jump = math.log(spike) if scale == "log" else spike - 1.0
        if e.shape[1] > 1:  # a generation above both neighbours (the last: above the one before) by `jump`
            after = np.concatenate([e[:, 2:], e[:, -2:-1]], axis=1)
            spiked = bool(np.any(e[:, 1:] - np.maximum(e[:, :-1], after) > jump))
    hi, lo = 1.0 + tol, 1.0 / (1.0 + tol)
    if bad.any():
        out["verdict"] = "diverging"
    elif not good.any():
        out["verdict"] = "inconclusive"  # nothing to compare (no paired floor)
    elif out["change_low"] > 1.0 and out["change"] > hi:
        out["verdict"] = "diverging"
    elif spiked:
        out["verdict"] = "unstable"
    elif out["change_high"] < 1.0 and out["change"] < lo:
        out["verdict"] = "converging"
    elif lo <= out["change_low"] and out["change_high"] <= hi:
        out["verdict"] = "bounded"
    else:
        out["verdict"] = "inconclusive"
    return out


def summarize(rows: list[dict[str, Any]], metric: str, *, start: int = 0) -> dict[str, Any]:
    """Contraction rate and verdict of one metric column of results.jsonl rows (chain means per generation).

    Rows without the metric (or with None) are skipped; first/last are the metric at the earliest
    (>= start, the first generation the verdict sees) and latest generation where it is finite. The
    verdict is regime_verdict's on this one trajectory against its generation `start` (the interval of
    the change is the regression's); a run that diverged, or with a chain whose metric was non-finite
    at some generation (metric_nonfinite in a row, or null in strict JSON), is 'diverging';
    nonfinite_chains is the most chains non-finite at one generation.
    """
    nulled = [r for r in rows if metric in (r.get("nonfinite") or [])]  # strict JSON: null = not finite
    pairs = sorted((int(r["generation"]), float(r[metric])) for r in rows if r.get(metric) is not None)
    pairs = sorted(pairs + [(int(r["generation"]), math.inf) for r in nulled])
    gens = np.array([g for g, _ in pairs], dtype=float)
    vals = np.array([v for _, v in pairs], dtype=float)
    fit = contraction_rate(vals, start, generations=gens)
    seen = vals[(gens >= start) & np.isfinite(vals)]
    lost = max((r.get(f"{metric}_nonfinite") or 0 for r in rows), default=0)
    died = any(r.get("status") == "diverged" for r in rows) or bool(lost)
    keep = gens >= start
    if keep.sum() >= 3:  # the sweep report's rule, on this run alone against its first generation
        verdict_ = regime_verdict(
            [list(vals[keep])],
            generations=list(gens[keep]),
            diverged=[died],  # type: ignore[arg-type]
        )["verdict"]
    else:
        verdict_ = "diverging" if died or not np.isfinite(vals).all() else "inconclusive"
    return {
        "metric": metric,
        "rho": fit["rho"],
        "rho_low": fit["rho_low"],
        "rho_high": fit["rho_high"],
        "verdict": verdict_,
        "first": float(seen[0]) if seen.size else float("nan"),
        "last": float(seen[-1]) if seen.size else float("nan"),
        "nonfinite_chains": lost,
    }
