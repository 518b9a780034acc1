"""Gaussian family: closed-form fit of a mean and a full covariance, for C independent chains at once.

Fit and sample are a handful of batched tensor ops (a mean, one batched matmul, one batched
Cholesky; one randn and one batched matmul), so 10^4 chains x 200 generations take seconds.
The small helpers at the top are shared with the gmm and kde families.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simulator.models.base import (
    Diverged,
    Example,
    broadcast_chains,
    check_options,
    check_temperature,
    check_weights,
    psd_factor,
    refuse,
)
from simulator.models.gaussian_stats import DDOF, GaussianStatistics

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LOG_2PI = math.log(2.0 * math.pi)


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype a config string names ("float32" or "float64": the dtype option's choices, checked
    with the family's other options)."""
    return DTYPES[name]


def check_chains(chains: int, event_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """Validate (chains, event_shape) and return them with the flattened event size d."""
    if int(chains) < 1:
        raise refuse("chains", "an integer >= 1", chains)
    shape = tuple(int(s) for s in event_shape)
    if not shape or any(s < 1 for s in shape):
        raise refuse("event_shape", "a non-empty tuple of positive sizes", event_shape)
    return int(chains), shape, math.prod(shape)


def prepare_data(
    data: torch.Tensor, chains: int, event_shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Chain-broadcast data, flatten events to (C, n, d), cast; NaN/inf data raise Diverged."""
    x = broadcast_chains(data, chains, len(event_shape))
    if tuple(x.shape[2:]) != event_shape:
        raise ValueError(f"expected events of shape {event_shape}, got {tuple(x.shape[2:])}")
    x = x.reshape(chains, x.shape[1], math.prod(event_shape)).to(dtype)
    # One reduction instead of an elementwise isfinite pass: any NaN/inf makes the sum non-finite.
    if not torch.isfinite(x.sum()):
        raise Diverged("non-finite values in the training data")
    return x


def flatten_query(
    x: torch.Tensor, chains: int, event_shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """Points to evaluate, as (C, m, d) on the dtype and device of the parameter tensor `like`."""
    x = broadcast_chains(x, chains, len(event_shape))
    if tuple(x.shape[2:]) != event_shape:
        raise ValueError(f"expected events of shape {event_shape}, got {tuple(x.shape[2:])}")
    return x.reshape(chains, x.shape[1], -1).to(dtype=like.dtype, device=like.device)


def standard_normal(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """N(0, 1) draws made on the generator's own device, then moved: reproducible wherever the model is."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)


def affine_tril(mean: torch.Tensor, factor: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """mean + scale * z @ factor^T for mean (C, d), lower-triangular factor (C, d, d), z (C, n, d).

    For small d, d fused multiply-adds beat a batched matmul of tiny matrices by about 3x on CPU,
    which is what keeps 10^4-chain sampling close to the cost of drawing the normals.
    """
    d = mean.shape[-1]
    if d > 8:
        return torch.baddbmm(mean.unsqueeze(1), z, factor.transpose(1, 2), alpha=scale)
    f = factor * scale if scale != 1.0 else factor
    # In place, last coordinate first: x_i = mean_i + sum_{j<=i} f_ij z_j only reads z_j for j <= i,
    # which are still untouched; no new (C, n, d) tensor is allocated.
    x = z
    for i in range(d - 1, -1, -1):
        xi = x[..., i]
        xi.mul_(f[:, None, i, i]).add_(mean[:, None, i])
        for j in range(i):
            xi.addcmul_(x[..., j], f[:, None, i, j])
    return x


class ClosedFormFamily:
    """What the closed-form families (gaussian, gmm, kde) share: the protocol's fit and sample around each
    family's `_fit(x, weights, generator)` (x: data (C, n, d) in the family's dtype; weights as given, for
    check_weights) and `_sample(n, generator, s)` (s: the checked temperature), after `_require`."""

    chains: int
    event_shape: tuple[int, ...]
    dtype: torch.dtype

    def _require(self) -> None:
        raise NotImplementedError

    def _fit(
        self, x: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _sample(self, n: int, generator: torch.Generator, s: float) -> torch.Tensor:
        raise NotImplementedError

    def fit(
        self,
        data: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        weights: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Closed-form fit to data (C, n, *event) with per-row weights (C, n) or (n,) (see `_fit`); labels,
        steps and progress are unused, and so is generator except where `_fit` says (gmm's EM start)."""
        return self._fit(prepare_data(data, self.chains, self.event_shape, self.dtype), weights, generator)

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw (C, n, *event) at temperature s (s < 1 is sampling bias); see `_sample`."""
        self._require()
        s = check_temperature(temperature)
        return self._sample(int(n), generator, s)


class GaussianFamily(ClosedFormFamily, GaussianStatistics):
    """N(mu, Sigma) fitted in closed form (ddof 0: maximum likelihood; ddof 1: unbiased covariance); with
    the FitsStatistics capability (GaussianStatistics: model.path=statistics)."""

    exact_likelihood = True
    # rules beyond the annotations and options.BOUNDS, for the config path and the constructor alike
    OPTIONS = {"ddof": DDOF, "dtype": {"choices": tuple(DTYPES)}}
    EXAMPLE = Example(chains=3, event_shape=(2,))

    def __init__(
        self, *, chains: int, event_shape: tuple[int, ...], ddof: int = 0, dtype: str = "float32"
    ) -> None:
        check_options(GaussianFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        self.chains, self.event_shape, self.dim = check_chains(chains, event_shape)
        self.ddof = int(ddof)
        self.dtype = resolve_dtype(dtype)
        self.mean: torch.Tensor | None = None  # (C, d)
        self.cov: torch.Tensor | None = None  # (C, d, d)
        self._factor: torch.Tensor | None = None  # (C, d, d), factor @ factor^T = cov
        self._degenerate: torch.Tensor | None = None  # (C,) covariance not positive definite

    @classmethod
    def from_params(
        cls, mean: torch.Tensor, cov: torch.Tensor, *, ddof: int = 0, dtype: str | None = None
    ) -> GaussianFamily:
        """A family already holding mean (C, d) and cov (C, d, d): a known truth or a perturbed start."""
        if mean.dim() != 2 or cov.shape != (*mean.shape, mean.shape[1]):
            raise ValueError(
                f"need mean (C, d) and cov (C, d, d), got {tuple(mean.shape)}, {tuple(cov.shape)}"
            )
        if dtype is None:
            dtype = "float64" if mean.dtype == torch.float64 else "float32"
        model = cls(chains=mean.shape[0], event_shape=(mean.shape[1],), ddof=ddof, dtype=dtype)
        model._set(mean.to(model.dtype), cov.to(device=mean.device, dtype=model.dtype))
        return model

    def _set(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Store parameters and the sampling factor; non-finite parameters raise Diverged."""
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise Diverged("non-finite Gaussian parameters")
        self.mean, self.cov = mean, cov
        self._factor, self._degenerate = psd_factor(cov)

    def _require(self) -> None:
        if self.mean is None:
            raise RuntimeError("GaussianFamily has no parameters yet: call fit() or load_state_dict() first")

    def _fit(
        self, x: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator | None
    ) -> dict[str, Any]:
        """Closed-form fit to data (C, n, *event); labels, steps and generator are unused (exact fit).

        weights (C, n) or (n,): the weighted fit with p_i = w_i / sum w. See `_fit_weighted`.
        """
        n = x.shape[1]
        w = check_weights(weights, self.chains, n)
        if w is not None:
            return self._fit_weighted(x, w)
        if n <= self.ddof:
            raise ValueError(f"need more than {self.ddof} points per chain, got {n}")
        mean = x.mean(dim=1)
        centred = x - mean.unsqueeze(1)
        cov = torch.bmm(centred.transpose(1, 2), centred) / (n - self.ddof)
        self._set(mean, cov)
        # Mean training log-likelihood in closed form: the summed Mahalanobis terms equal d (n - ddof).
        logdet = 2.0 * self._factor.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        ll = -0.5 * (self.dim * _LOG_2PI + logdet + self.dim * (n - self.ddof) / n)
        return {"log_likelihood": float(ll.mean())}

    def _fit_weighted(self, x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
        """Weighted fit, p_i = w_i / sum w: mu = sum p_i x_i, Sigma = sum p_i (x_i - mu)(x_i - mu)^T / norm.

        norm = 1 - ddof sum_i p_i^2.

        ddof 0 is the weighted maximum-likelihood fit; integer weights give exactly the fit to the data
        with each row repeated w_i times. ddof 1 treats the weights as reliability weights (relative
        importance, not counts): dividing by 1 - sum p_i^2 = (n_eff - 1) / n_eff, with Kish's effective
        sample size n_eff = 1 / sum p_i^2, makes Sigma unbiased for i.i.d. rows under fixed weights, and is
        n / (n - 1) for equal weights. (It is not the fit to repeated rows, whose divisor would be sum w - 1.)
        """
        p = (w / w.sum(1, keepdim=True)).to(device=x.device, dtype=x.dtype)  # (C, n), sums to 1
        mean = torch.bmm(p.unsqueeze(1), x).squeeze(1)
        centred = x - mean.unsqueeze(1)
        norm = 1 - self.ddof * p.square().sum(1)  # (C,)
        if not bool((norm > 0).all()):
            raise ValueError("weights: ddof=1 needs an effective sample size 1 / sum p_i^2 above 1 per chain")
        cov = torch.bmm((centred * p.unsqueeze(-1)).transpose(1, 2), centred) / norm.view(-1, 1, 1)
        self._set(mean, cov)
        # Weighted mean training log-likelihood: sum_i p_i (Mahalanobis)_i = d (1 - ddof sum_i p_i^2).
        logdet = 2.0 * self._factor.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        ll = -0.5 * (self.dim * _LOG_2PI + logdet + self.dim * norm)
        return {"log_likelihood": float(ll.mean())}

    def _sample(self, n: int, generator: torch.Generator, s: float) -> torch.Tensor:
        """Draw (C, n, *event) from N(mu, s Sigma), s = temperature (s < 1 is sampling bias)."""
        z = standard_normal((self.chains, int(n), self.dim), generator, self.dtype, self.mean.device)
        x = affine_tril(self.mean, self._factor, z, math.sqrt(s))
        return x.reshape(self.chains, int(n), *self.event_shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (C, m) of x (C, m, *event) or (m, *event); -inf for collapsed chains."""
        self._require()
        x = flatten_query(x, self.chains, self.event_shape, self.mean)
        diff = (x - self.mean.unsqueeze(1)).transpose(1, 2)  # (C, d, m)
        white = torch.linalg.solve_triangular(self._factor, diff, upper=False)
        logdet = 2.0 * self._factor.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        out = -0.5 * (self.dim * _LOG_2PI + logdet.unsqueeze(1) + white.square().sum(1))
        if self._degenerate is None:  # fitted from statistics: the factor came without the mask
            self._degenerate = torch.linalg.cholesky_ex(self.cov).info != 0
        return out.masked_fill(self._degenerate.unsqueeze(1), -math.inf)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors in the family's dtype (loadable with weights_only=True); empty before a fit."""
        if self.mean is None:
            return {}
        return {"mean": self.mean.to(self.dtype), "cov": self.cov.to(self.dtype)}  # fit_statistics: float64

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore parameters written by state_dict (an empty dict clears them)."""
        if not state:
            self.reset()
            return
        mean, cov = state["mean"], state["cov"]
        if mean.shape != (self.chains, self.dim) or cov.shape != (self.chains, self.dim, self.dim):
            raise ValueError(f"state has mean {tuple(mean.shape)}, cov {tuple(cov.shape)}; does not fit")
        self._set(mean.to(self.dtype), cov.to(device=mean.device, dtype=self.dtype))

    def parameters_vector(self) -> torch.Tensor:
        """(C, d + d(d+1)/2): the mean and the covariance's unique (lower-triangular) entries."""
        self._require()
        rows, cols = torch.tril_indices(self.dim, self.dim, device=self.cov.device)
        return torch.cat([self.mean, self.cov[:, rows, cols]], dim=1)

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Forget the parameters (the closed-form fit never depends on them anyway)."""
        self.mean = self.cov = self._factor = self._degenerate = None

    def to(self, device: str | torch.device) -> GaussianFamily:
        """Move the parameters to device (in place) and return self."""
        if self.mean is not None:
            self._set(self.mean.to(device), self.cov.to(device))
        return self
