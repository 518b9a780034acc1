"""Closed forms of the discrete (token) collapse results, for the categorical family refitted by counts
(numpy only; docs/science.md, "Tokens"). The tests (tests/test_categorical.py) and the experiment
(experiments/tokens/) compare simulations over many chains with these.

Conventions: p_0 is the truth (V,), s_0 = sum_i p_0(i)^2 its collision probability; generation 0 of the loop
is the maximum-likelihood fit to n_0 real rows (the data's n_train), generation t >= 1 the fit to the
policy's D_t. A multinomial draw of m rows from q gives an empirical q' with E[q'] = q and
E||q' - q||^2 = (1 - sum q^2) / m, which is all the derivations below use.

- Shumailov et al. 2024 (replace): p_t is a martingale, E[p_t] = p_0, and the chain is absorbed in a
  single token; it ends on token i with probability p_0(i).
- Seddik et al. 2024 (replace): S_t = E sum_i p_t(i)^2 = 1 - (1 - 1/n_0)(1 - 1/n)^t (1 - s_0) (their S_m, with
  S_0 the truth's), so E||p_t - p_0||^2 = S_t - s_0 grows to 1 - s_0: total collapse.
- mix (all n_0 real rows + k = round(lambda n_0) samples of G_{t-1}; alpha = k / (n_0 + k), Seddik et al.'s
  synthetic share n / (N + n)): p_t = (1 - alpha) p_R + alpha q_t, so d_t = p_t - p_R (p_R = generation 0)
  has E||d_t||^2 = A (1 - r^t) / (1 - r), A = alpha^2 (1 - s_0)(1 - 1/n_0) / k, r = alpha^2 (1 - 1/k):
  bounded for every alpha < 1, and E||p_t - p_0||^2 = (1 - s_0) / n_0 + E||d_t||^2.
  Given p_R, coordinate by coordinate: v_t(i) = E[d_t(i)^2 | p_R] = a_i (1 - r^t) / (1 - r), a_i = alpha^2
  p_R(i) (1 - p_R(i)) / k (E[p_t | p_R] = p_R), whose sum over i, averaged over p_R, is the line above.
  Seddik et al. bound E||p^(m) - p^(1)||_1 (their p^(1) is our p_R); here Jensen gives, given p_R,
  E||d_t||_1 <= sum_i sqrt(v_t(i)) (`mix_l1_bound`; derived here, their own bound was not read).
  The long-run excess of the error over the real fit's, E||d_inf||^2 / ((1 - s_0) / n_0) = alpha^2 (n_0 - 1)
  / (k (1 - r)) (`mix_excess_ratio`), does not depend on the truth and stays below alpha / (1 + alpha) < 1/2:
  in expectation no share of synthetic rows collapses a loop that keeps its n_0 real rows; the share a
  tolerance eps allows is `mix_tolerated_rows`.
- fresh (N new real rows of the truth + m samples of G_{t-1}, alpha = m / (N + m)):
  e_t = E||p_t - p_0||^2 = (1 - s_0) / (N + m) + alpha^2 (1 - 1/m) e_{t-1}, e_0 = (1 - s_0) / n_0.
- Dohmatob et al. 2024 (tails): a next-token model that has not seen token i errs on it; its test error
  is the truth's mass on the tokens it lost, E = sum_i p_0(i) (1 - q(i))^T after T rows of q. For q = p_0
  (real data) this is Hutter's law, ~ T^-(1 - 1/beta) for Zipf(beta); for q the top-k (top-p) truncation
  of a model, every token q drops adds its whole p_0 mass: the error stops falling at the cut tail's mass.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "collision_replace",
    "l2sq_fresh",
    "l2sq_mix",
    "l2sq_replace",
    "lost_mass",
    "mix_deviation",
    "mix_deviation_coords",
    "mix_excess_ratio",
    "mix_l1_bound",
    "mix_tolerated_rows",
    "tail_beyond",
    "zipf",
]


def zipf(vocab: int, exponent: float) -> np.ndarray:
    """p(i) proportional to (i + 1)^(-exponent), i = 0 .. vocab - 1 (simulator.data.tokens.token_probs)."""
    w = np.arange(1, vocab + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def collision_replace(s0: float, n0: int, n: int, t: np.ndarray | int) -> np.ndarray:
    """E sum_i p_t(i)^2 of generation t under replace, n rows a generation after n0 real ones."""
    t = np.asarray(t, dtype=np.float64)
    return 1 - (1 - 1 / n0) * (1 - 1 / n) ** t * (1 - s0)


def l2sq_replace(s0: float, n0: int, n: int, t: np.ndarray | int) -> np.ndarray:
    """E||p_t - p_0||^2 under replace: the collision's excess over the truth's."""
    return collision_replace(s0, n0, n, t) - s0


def mix_deviation(s0: float, n0: int, k: int, t: np.ndarray | int) -> np.ndarray:
    """E||p_t - p_R||^2 under mix, p_R the fit to the n0 real rows (generation 0), k synthetic rows."""
    t = np.asarray(t, dtype=np.float64)
    alpha = k / (n0 + k)
    a, r = alpha**2 * (1 - s0) * (1 - 1 / n0) / k, alpha**2 * (1 - 1 / k)
    return a * (1 - r**t) / (1 - r)


def mix_deviation_coords(p_r: np.ndarray, n0: int, k: int, t: np.ndarray | int) -> np.ndarray:
    """E[(p_t(i) - p_R(i))^2 | p_R] under mix: p_R (..., V) the fit to the n0 real rows, k synthetic rows a
    generation; shape t.shape + p_r.shape."""
    p_r = np.asarray(p_r, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64).reshape(np.shape(t) + (1,) * p_r.ndim)
    alpha = k / (n0 + k)
    a, r = alpha**2 * p_r * (1 - p_r) / k, alpha**2 * (1 - 1 / k)
    return a * (1 - r**t) / (1 - r)


def mix_l1_bound(p_r: np.ndarray, n0: int, k: int, t: np.ndarray | int) -> np.ndarray:
    """sum_i sqrt(E[d_t(i)^2 | p_R]) >= E[||p_t - p_R||_1 | p_R] (Jensen), shape t.shape + p_r.shape[:-1]."""
    return np.sqrt(mix_deviation_coords(p_r, n0, k, t)).sum(-1)


def mix_excess_ratio(n0: int, k: int | np.ndarray) -> np.ndarray:
    """lim_t E||p_t - p_R||^2 / E||p_R - p_0||^2 under mix (k synthetic rows beside n0 real ones): the error's
    long-run excess over the real fit's, alpha^2 (n0 - 1) / (k (1 - r)), whatever the truth."""
    k = np.asarray(k, dtype=np.float64)
    alpha = k / (n0 + k)
    return alpha**2 * (n0 - 1) / (k * (1 - alpha**2 * (1 - 1 / k)))


def mix_tolerated_rows(n0: int, eps: float, k_max: int = 10**9) -> int:
    """The most synthetic rows k a mixed loop with n0 real rows takes while its long-run error stays within
    (1 + eps) times the real fit's (`mix_excess_ratio` <= eps; it rises with k). k_max when every k up to it
    is tolerated (eps >= the ratio's limit (n0 - 1) / (2 n0 + 1)), 0 when none is."""
    if mix_excess_ratio(n0, 1) > eps:
        return 0
    if mix_excess_ratio(n0, k_max) <= eps:
        return k_max
    lo, hi = 1, k_max  # ratio(lo) <= eps < ratio(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mix_excess_ratio(n0, mid) <= eps else (lo, mid)
    return lo


def l2sq_mix(s0: float, n0: int, k: int, t: np.ndarray | int) -> np.ndarray:
    """E||p_t - p_0||^2 under mix: the real fit's error plus the synthetic deviation (uncorrelated)."""
    return (1 - s0) / n0 + mix_deviation(s0, n0, k, t)


def l2sq_fresh(s0: float, n0: int, n_real: int, n_syn: int, generations: int) -> np.ndarray:
    """E||p_t - p_0||^2 for t = 0 .. generations under fresh (source truth): n_real new rows of the truth and
    n_syn samples of G_{t-1} each generation."""
    alpha = n_syn / (n_real + n_syn)
    r = alpha**2 * (1 - 1 / n_syn) if n_syn else 0.0
    out = [(1 - s0) / n0]
    for _ in range(generations):
        out.append((1 - s0) / (n_real + n_syn) + r * out[-1])
    return np.asarray(out)


def lost_mass(p0: np.ndarray, q: np.ndarray, rows: int) -> np.ndarray:
    """E sum_i p0(i) [token i unseen among `rows` draws of q] = sum_i p0(i) (1 - q(i))^rows; q (..., V)."""
    return (np.asarray(p0) * (1 - np.asarray(q)) ** rows).sum(-1)


def tail_beyond(p0: np.ndarray, k: int) -> float:
    """The truth's mass beyond its k most probable tokens (the floor of a top-k cut's error)."""
    return float(np.sort(np.asarray(p0))[::-1][k:].sum())
