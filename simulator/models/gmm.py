"""Gaussian mixture family fitted by EM, for C independent chains in one tensor program.

Parameters are (C, K, ...) tensors; every EM step updates all chains at once. A chain stops
updating as soon as its own log-likelihood has converged, so its result does not depend on which
other chains share the batch. Warm start: a fit starts from the current parameters when there
are any (after a fit or a load); after reset() it initialises from the data (greedy k-means++).

Weighted fits (fit(..., weights=w)) maximise sum_i w_i log p(x_i): the M-step uses responsibilities
times w_i, and the initialisation draws its first centre and its k-means++ candidates with
probabilities times w_i. So integer weights give, from the same start, the EM iterates of the data
with each row repeated w_i times (to float rounding), and the same initialisation in distribution.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simulator.models.base import Diverged, Example, check_options, check_weights
from simulator.models.gaussian import (
    DTYPES,
    ClosedFormFamily,
    check_chains,
    flatten_query,
    resolve_dtype,
    standard_normal,
)

_LOG_2PI = math.log(2.0 * math.pi)


class GMMFamily(ClosedFormFamily):
    """K-component Gaussian mixture (full or diagonal covariances), maximum likelihood by EM."""

    exact_likelihood = True
    EXAMPLE = Example(chains=3, rows=40, options={"components": 2, "em_iters": 10})
    # rules beyond the annotations and options.BOUNDS (tol 0: every em_iters step runs), for the config
    # path and the constructor alike
    OPTIONS = {
        "tol": {"low": 0},  # 0: every EM iteration runs (BOUNDS says > 0)
        "covariance": {"choices": ("full", "diag")},
        "dtype": {"choices": tuple(DTYPES)},
    }

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],
        components: int = 2,
        em_iters: int = 100,
        tol: float = 1e-6,
        reg_covar: float = 1e-6,
        covariance: str = "full",
        dtype: str = "float32",
    ) -> None:
        check_options(GMMFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        self.chains, self.event_shape, self.dim = check_chains(chains, event_shape)
        self.components, self.em_iters, self.tol = int(components), int(em_iters), float(tol)
        self.reg_covar, self.covariance = float(reg_covar), covariance
        self.dtype = resolve_dtype(dtype)
        self.weights: torch.Tensor | None = None  # (C, K)
        self.means: torch.Tensor | None = None  # (C, K, d)
        self.covs: torch.Tensor | None = None  # (C, K, d, d) full, (C, K, d) diag

    # --- EM pieces -------------------------------------------------------------------------------

    def _component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x_i | mu_k, Sigma_k) as (C, m, K)."""
        if self.covariance == "diag":
            diff = x.unsqueeze(2) - self.means.unsqueeze(1)  # (C, m, K, d)
            maha = (diff.square() / self.covs.unsqueeze(1)).sum(-1)
            logdet = self.covs.log().sum(-1)
        else:
            chol, info = torch.linalg.cholesky_ex(self.covs)
            if (info != 0).any():
                raise Diverged("a GMM covariance is not positive definite; raise reg_covar")
            eye = torch.eye(self.dim, dtype=chol.dtype, device=chol.device)
            inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # A_k = L_k^-1
            # Whitened points A_k (x - mu_k) for all k from one batched matmul x @ [A_1^T .. A_K^T].
            c, k, d = inv.shape[:3]
            stacked = inv.permute(0, 3, 1, 2).reshape(c, d, k * d)
            white = torch.bmm(x, stacked).view(c, x.shape[1], k, d)
            white = white - (inv @ self.means.unsqueeze(-1)).squeeze(-1).unsqueeze(1)
            maha = white.square().sum(-1)
            logdet = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        gauss = -0.5 * (self.dim * _LOG_2PI + logdet.unsqueeze(1) + maha)
        return gauss + self.weights.log().unsqueeze(1)

    def _m_step(self, x: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Weights, means and covariances (plus reg_covar) maximising the expected log-likelihood."""
        nk = resp.sum(1) + 10 * torch.finfo(x.dtype).eps  # (C, K); eps keeps empty components finite
        means = torch.bmm(resp.transpose(1, 2), x) / nk.unsqueeze(-1)
        diff = x.unsqueeze(2) - means.unsqueeze(1)  # (C, n, K, d)
        weighted = diff * resp.unsqueeze(-1)
        if self.covariance == "diag":
            covs = (weighted * diff).sum(1) / nk.unsqueeze(-1) + self.reg_covar
        else:
            covs = torch.matmul(weighted.permute(0, 2, 3, 1), diff.transpose(1, 2)) / nk[..., None, None]
            covs = covs + self.reg_covar * torch.eye(self.dim, dtype=x.dtype, device=x.device)
        return nk / x.shape[1], means, covs

    def _initialise(self, x: torch.Tensor, generator: torch.Generator, w: torch.Tensor | None = None) -> None:
        """Greedy k-means++ centres (2 + log K candidates per step), shared data covariance, equal weights.

        Row weights w (C, n), mean 1, scale every draw's probability and every sum over rows.
        """
        chains, n, d = x.shape
        rows = torch.arange(chains, device=x.device)
        if w is None:
            first = torch.randint(n, (chains,), generator=generator, device=generator.device).to(x.device)
        else:
            first = torch.multinomial(w.to(generator.device), 1, generator=generator).squeeze(1).to(x.device)
        centres = [x[rows, first]]
        closest = (x - centres[0].unsqueeze(1)).square().sum(-1)  # (C, n) squared distance to centres
        trials = 2 + int(math.log(self.components))
        for _ in range(1, self.components):
            mass = closest if w is None else closest * w
            total = mass.sum(1, keepdim=True)
            probs = torch.where(
                total > 0, mass / total.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(mass)
            )
            if w is not None:  # all the weight sits on centres already: any row of positive weight
                probs = torch.where(total > 0, probs, w)
            cand = torch.multinomial(
                probs.to(generator.device), trials, replacement=True, generator=generator
            )
            cand_pts = x[rows.unsqueeze(1), cand.to(x.device)]  # (C, trials, d)
            dist = (x.unsqueeze(1) - cand_pts.unsqueeze(2)).square().sum(-1)  # (C, trials, n)
            near = torch.minimum(closest.unsqueeze(1), dist)
            best = (near if w is None else near * w.unsqueeze(1)).sum(-1).argmin(1)  # lowest potential
            centres.append(cand_pts[rows, best])
            closest = torch.minimum(closest, dist[rows, best])
        if w is None:
            centred = x - x.mean(1, keepdim=True)
            cov = torch.bmm(centred.transpose(1, 2), centred) / n  # (C, d, d)
        else:
            centred = x - (w.unsqueeze(-1) * x).mean(1, keepdim=True)
            cov = torch.bmm((centred * w.unsqueeze(-1)).transpose(1, 2), centred) / n
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        shared = cov.diagonal(dim1=-2, dim2=-1) if self.covariance == "diag" else cov
        shape = (chains, self.components, *shared.shape[1:])
        self.covs = shared.unsqueeze(1).expand(shape) + self.reg_covar * (
            1 if self.covariance == "diag" else eye
        )
        self.means = torch.stack(centres, 1)
        self.weights = torch.full(
            (chains, self.components), 1.0 / self.components, dtype=x.dtype, device=x.device
        )

    # --- protocol --------------------------------------------------------------------------------

    def _fit(
        self, x: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator | None
    ) -> dict[str, Any]:
        """EM on data (C, n, *event) for at most em_iters iterations (weighted by row weights (C, n) or (n,)).

        labels are unused; so is steps, the neural families' step budget from the train config:
        EM's own budget is em_iters and tol.
        """
        w = check_weights(weights, self.chains, x.shape[1])
        if w is not None:
            w = w.to(x.device, x.dtype)  # mean 1 per chain: sums over rows keep the scale of n
        if self.weights is None:
            if generator is None:
                raise ValueError("GMMFamily.fit needs a generator to initialise from the data")
            self._initialise(x, generator, w)
        else:
            self._move(x.device)
        active = torch.ones(self.chains, dtype=torch.bool, device=x.device)
        used = torch.zeros(self.chains, dtype=torch.long, device=x.device)
        prev = torch.full((self.chains,), -math.inf, dtype=x.dtype, device=x.device)
        for _ in range(self.em_iters):
            log_joint = self._component_log_prob(x)
            log_norm = torch.logsumexp(log_joint, dim=-1, keepdim=True)
            per_row = log_norm.squeeze(-1) if w is None else log_norm.squeeze(-1) * w
            ll = per_row.mean(1)  # (weighted) mean per-sample log-likelihood, (C,)
            if not torch.isfinite(ll).all():
                raise Diverged("non-finite GMM log-likelihood during EM")
            active &= (ll - prev).abs() >= self.tol  # a converged chain stays frozen
            if not active.any():
                break
            resp = (log_joint - log_norm).exp()
            weights, means, covs = self._m_step(x, resp if w is None else resp * w.unsqueeze(-1))
            keep = active.view(-1, 1)
            self.weights = torch.where(keep, weights, self.weights)
            self.means = torch.where(keep.unsqueeze(-1), means, self.means)
            self.covs = torch.where(keep.view(-1, *[1] * (covs.dim() - 1)), covs, self.covs)
            used += active
            prev = ll
        final = torch.logsumexp(self._component_log_prob(x), dim=-1)
        final = (final if w is None else final * w).mean(1)
        if not torch.isfinite(final).all():
            raise Diverged("non-finite GMM log-likelihood after EM")
        usedf = used.double()
        return {
            "em_iters": float(usedf.mean()),
            "em_iters_max": float(usedf.max()),
            "converged_frac": float((~active).double().mean()),
            "log_likelihood": float(final.double().mean()),
        }

    def _sample(self, n: int, generator: torch.Generator, s: float) -> torch.Tensor:
        """Draw (C, n, *event): a component by weight, then N(mu_k, s Sigma_k) with s = temperature."""
        dev = self.means.device
        comp = torch.multinomial(self.weights.to(generator.device), n, replacement=True, generator=generator)
        comp = comp.to(dev)  # (C, n)
        z = standard_normal((self.chains, n, self.dim), generator, self.dtype, dev)
        rows = torch.arange(self.chains, device=dev).unsqueeze(1)
        mu = self.means[rows, comp]  # (C, n, d)
        if self.covariance == "diag":
            noise = self.covs[rows, comp].sqrt() * z
        else:
            chol = torch.linalg.cholesky(self.covs)[rows, comp]  # (C, n, d, d)
            noise = (chol @ z.unsqueeze(-1)).squeeze(-1)
        return (mu + math.sqrt(s) * noise).reshape(self.chains, n, *self.event_shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact mixture log-density (C, m) of x (C, m, *event) or (m, *event)."""
        self._require()
        x = flatten_query(x, self.chains, self.event_shape, self.means)
        return torch.logsumexp(self._component_log_prob(x), dim=-1)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (loadable with weights_only=True); empty before the first fit."""
        if self.weights is None:
            return {}
        return {"weights": self.weights, "means": self.means, "covs": self.covs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore parameters written by state_dict (an empty dict clears them); the next fit warm-starts."""
        if not state:
            self.reset()
            return
        c, k, d = self.chains, self.components, self.dim
        cov_shape = (c, k, d) if self.covariance == "diag" else (c, k, d, d)
        shapes = {"weights": (c, k), "means": (c, k, d), "covs": cov_shape}
        for key, shape in shapes.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"state {key} has shape {tuple(state[key].shape)}, expected {shape}")
        dev = state["means"].device
        self.weights, self.means, self.covs = (state[key].to(device=dev, dtype=self.dtype) for key in shapes)

    def parameters_vector(self) -> torch.Tensor:
        """(C, K (1 + d + cov entries)), components ordered by their mean's first coordinate.

        Ordering removes the label-switching ambiguity, so distances between fits mean something.
        """
        self._require()
        order = self.means[..., 0].argsort(dim=1)
        rows = torch.arange(self.chains, device=order.device).unsqueeze(1)
        covs = self.covs[rows, order]
        if self.covariance == "full":
            r, c = torch.tril_indices(self.dim, self.dim, device=covs.device)
            covs = covs[..., r, c]
        parts = [self.weights[rows, order].unsqueeze(-1), self.means[rows, order], covs]
        return torch.cat(parts, dim=-1).reshape(self.chains, -1)

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Forget the parameters, so the next fit initialises from its data."""
        self.weights = self.means = self.covs = None

    def to(self, device: str | torch.device) -> GMMFamily:
        """Move the parameters to device (in place) and return self."""
        if self.weights is not None:
            self._move(torch.device(device))
        return self

    def _move(self, device: torch.device) -> None:
        self.weights, self.means, self.covs = (t.to(device) for t in (self.weights, self.means, self.covs))

    def _require(self) -> None:
        if self.weights is None:
            raise RuntimeError("GMMFamily has no parameters yet: call fit() or load_state_dict() first")
