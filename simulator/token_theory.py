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
