"""Fixed-bandwidth Gaussian kernel density estimate, for C independent chains in one tensor program.

Fitting stores the points; the density is (1/n) sum_j N(x | x_j, h^2 I). It is the simplest
exact-likelihood family that memorises its training set, the extreme case for self-consumption.

Weighted fits (fit(..., weights=w)) store p_j = w_j / sum w with the points: the density is the weighted
mixture sum_j p_j N(x | x_j, h^2 I) and a sample picks its point with probability p_j, so integer weights
give exactly the density of the data with each row repeated w_j times. The bandwidth h is an option, not
a rule of the data, so weights leave it as it is. A data-driven rule (Scott's h ~ n^(-1/(d+4)), Silverman's)
would take Kish's effective sample size n_eff = (sum w)^2 / sum w^2 in place of n, and weighted moments.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simulator.models.base import Example, check_options, check_weights
from simulator.models.gaussian import (
    DTYPES,
    ClosedFormFamily,
    check_chains,
    flatten_query,
    resolve_dtype,
    standard_normal,
)

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 1 << 24  # bound on the (C, chunk, n, d) difference tensor built in log_prob


class KDEFamily(ClosedFormFamily):
    """Gaussian KDE with bandwidth h: sample = a stored point + h sqrt(s) N(0, I)."""

    exact_likelihood = True
    OPTIONS = {"dtype": {"choices": tuple(DTYPES)}}  # beyond the annotations and options.BOUNDS
    EXAMPLE = Example(chains=3)

    def __init__(
        self, *, chains: int, event_shape: tuple[int, ...], bandwidth: float = 0.1, dtype: str = "float32"
    ) -> None:
        check_options(KDEFamily, locals())  # each option: its type and bounds (bandwidth > 0: options.BOUNDS)
        self.chains, self.event_shape, self.dim = check_chains(chains, event_shape)
        self.bandwidth = float(bandwidth)
        self.dtype = resolve_dtype(dtype)
        self.points: torch.Tensor | None = None  # (C, n, d)
        self.weights: torch.Tensor | None = None  # (C, n) kernel weights p_j summing to 1; None: 1/n each

    def _fit(
        self, x: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator | None
    ) -> dict[str, Any]:
        """Store data's points (C, n, *event) and kernel weights; labels, steps, generator: unused."""
        if x.shape[1] < 1:
            raise ValueError("a KDE needs at least one point per chain")
        w = check_weights(weights, self.chains, x.shape[1])
        self.points = x.clone()  # a copy: the caller may reuse its buffer
        if w is None:
            self.weights = None
            return {"points": float(x.shape[1])}
        p = w / w.sum(1, keepdim=True)
        self.weights = p.to(x.device, self.dtype)
        return {"points": float(x.shape[1]), "n_eff": float((1 / p.square().sum(1)).mean())}

    def _sample(self, n: int, generator: torch.Generator, s: float) -> torch.Tensor:
        """Draw (C, n, *event): a uniformly chosen stored point plus h sqrt(s) N(0, I) noise."""
        dev = self.points.device
        if self.weights is None:
            idx = torch.randint(
                self.points.shape[1], (self.chains, n), generator=generator, device=generator.device
            )
        else:  # a point with probability p_j
            idx = torch.multinomial(
                self.weights.to(generator.device), n, replacement=True, generator=generator
            )
        rows = torch.arange(self.chains, device=dev).unsqueeze(1)
        centres = self.points[rows, idx.to(dev)]
        z = standard_normal((self.chains, n, self.dim), generator, self.dtype, dev)
        out = torch.add(centres, z, alpha=self.bandwidth * math.sqrt(s))
        return out.reshape(self.chains, n, *self.event_shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (C, m) of x (C, m, *event) or (m, *event), in chunks of query points."""
        self._require()
        x = flatten_query(x, self.chains, self.event_shape, self.points)
        n = self.points.shape[1]
        h2 = self.bandwidth**2
        const = -math.log(n) - 0.5 * self.dim * (_LOG_2PI + math.log(h2))
        if self.weights is not None:  # log p_j inside the sum instead of -log n outside
            const, log_p = const + math.log(n), self.weights.log().unsqueeze(1)  # (C, 1, n)
        chunk = max(1, _CHUNK_ELEMENTS // (self.chains * n * self.dim))
        out = []
        for start in range(0, x.shape[1], chunk):
            # Explicit differences, not torch.cdist: its matmul shortcut loses precision for close points.
            diff = x[:, start : start + chunk].unsqueeze(2) - self.points.unsqueeze(1)  # (C, chunk, n, d)
            log_k = diff.square().sum(-1) / (-2.0 * h2)
            if self.weights is not None:
                log_k = log_k + log_p
            out.append(torch.logsumexp(log_k, dim=-1) + const)
        return torch.cat(out, dim=1)

    def state_dict(self) -> dict[str, Any]:
        """The stored points (and kernel weights of a weighted fit) as plain tensors; empty before a fit."""
        if self.points is None:
            return {}
        return (
            {"points": self.points}
            if self.weights is None
            else {"points": self.points, "weights": self.weights}
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore points written by state_dict (an empty dict clears them)."""
        if not state:
            self.reset()
            return
        pts = state["points"]
        if pts.dim() != 3 or pts.shape[0] != self.chains or pts.shape[2] != self.dim:
            raise ValueError(
                f"state points have shape {tuple(pts.shape)}, expected ({self.chains}, n, {self.dim})"
            )
        w = state.get("weights")
        if w is not None and tuple(w.shape) != tuple(pts.shape[:2]):
            raise ValueError(f"state weights have shape {tuple(w.shape)}, expected {tuple(pts.shape[:2])}")
        self.points = pts.to(self.dtype)
        self.weights = None if w is None else w.to(device=pts.device, dtype=self.dtype)

    def parameters_vector(self) -> None:
        """None: a KDE's 'parameters' are its training points, so a parameter distance is meaningless."""
        return None

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Forget the stored points."""
        self.points = self.weights = None

    def to(self, device: str | torch.device) -> KDEFamily:
        """Move the stored points to device (in place) and return self."""
        if self.points is not None:
            self.points = self.points.to(device)
        if self.weights is not None:
            self.weights = self.weights.to(device)
        return self

    def _require(self) -> None:
        if self.points is None:
            raise RuntimeError("KDEFamily has no points yet: call fit() or load_state_dict() first")
