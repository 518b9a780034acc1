"""Linear regression family: (weighted, optionally ridge) least squares per chain, whose samples are rows
whose labels come from the fitted model plus Gaussian noise -- the model-collapse setting of Gerstgrasser
et al. (2024), Dey & Donoho (2024) and Dohmatob et al. (2025).

A row is one vector (x_1, ..., x_d, y), the label last (simulator.data.regression), so D_t, S_t and every
policy are the loop's (chains, n, d + 1) tensors. The fit and the draw are a few batched tensor ops over
chains (one batched Cholesky of the d x d Gram matrices), as the Gaussian family's are.

What the samples' covariates are is the option `design`:
- "fixed" (Gerstgrasser et al.'s theory, after Dohmatob et al. 2024): the covariates of the
  training set are kept (the first `design_rows` rows; null: all) and sample(n) gives new labels on them,
  row i on design row i mod m. Every policy that keeps the training sets' first rows the real set's design
  -- replace, mix, accumulate, real_only -- then trains every generation on the one design X the theory
  fixes (accumulate on X stacked t + 1 times); those that draw random rows of the pool (accumulate_subsample,
  fresh, sample.from_last > 1, curation) are refused (`refuses`), and so is kl_truth: the family then models
  y given x only.
- "gaussian" (random design): the covariates are a zero-mean Gaussian fitted to the training covariates,
  Sigma_x = sum_i p_i x_i x_i^T, and sample(n) draws new ones; every policy applies.

The labels' noise variance is `noise`^2 when given (the papers' known sigma^2), else the fitted one, the
unbiased RSS / (N - d) (weighted: N/(N - d) sum_i p_i r_i^2, p the normalised weights; ridge > 0 or N <= d:
the mean squared residual). log_prob is the label's Gaussian log-density given x, plus the covariates' under
design=gaussian (the family then models the whole row).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from simulator.models.base import (
    Diverged,
    Example,
    check_options,
    check_weights,
    psd_factor,
    refuse,
)
from simulator.models.gaussian import (
    ClosedFormFamily,
    flatten_query,
    resolve_dtype,
    standard_normal,
)

DESIGNS = ("fixed", "gaussian")
_LOG_2PI = math.log(2.0 * math.pi)


class LinearRegressionFamily(ClosedFormFamily):
    """y = x . w + N(0, s^2) with w the (weighted, ridge) least-squares fit of the last coordinate on the
    others, for C chains at once; rows drawn on the fixed design or on fitted Gaussian covariates."""

    exact_likelihood = True
    OPTIONS = {"design": {"choices": DESIGNS}, "dtype": {"choices": ("float32", "float64")},
               "ridge": {"low": 0}, "design_rows": {"low": 1}}  # fmt: skip
    EXAMPLE = Example(chains=3, event_shape=(4,), rows=32)

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],
        design: str = "fixed",
        design_rows: int | None = None,
        ridge: float = 0.0,
        noise: float | None = None,
        dtype: str = "float64",
    ) -> None:
        check_options(LinearRegressionFamily, locals())  # each option: type, bounds, choices (OPTIONS)
        if int(chains) < 1:
            raise refuse("chains", "an integer >= 1", chains)
        shape = tuple(int(s) for s in event_shape)
        if len(shape) != 1 or shape[0] < 2:
            raise refuse("event_shape", "(d + 1,) with d >= 1: d covariates and the label last", event_shape)
        self.chains, self.event_shape, self.features = int(chains), shape, shape[0] - 1
        self.design, self.design_rows, self.ridge = design, design_rows, float(ridge)
        self.noise = None if noise is None else float(noise)
        self.dtype = resolve_dtype(dtype)
        self.w: torch.Tensor | None = None  # (C, d)
        self.noise_var: torch.Tensor | None = None  # (C,)
        self.x_design: torch.Tensor | None = None  # (C, m, d): design=fixed
        self.x_cov: torch.Tensor | None = None  # (C, d, d): design=gaussian
        self._factor: torch.Tensor | None = None  # (C, d, d), factor @ factor^T = x_cov
        self._degenerate: torch.Tensor | None = None  # (C,) x_cov not positive definite

    @classmethod
    def refuses(cls, run: Mapping[str, Any]) -> str | None:
        """The one line for what a fixed design cannot run (simulator.checks reads it from the plain config):
        a random draw of the pool's rows would change the design, and the family then models y given x
        only, so a metric of the joint density (kl_truth) has no meaning."""
        section = run.get("model") or {}
        if ((section.get("options") or {}).get("design") or "fixed") != "fixed":
            return None
        policy, sample = run.get("policy") or {}, run.get("sample") or {}
        name = policy.get("name")
        if name in ("accumulate_subsample", "fresh"):
            return (f"policy: {name} draws random rows of the pool (or new real rows), so the design of "
                    "model.options.design=fixed would change; use replace, mix, accumulate or real_only, or "
                    "model.options.design=gaussian")  # fmt: skip
        if (sample.get("from_last") or 1) != 1:
            return ("sample.from_last: blocks of earlier generations' samples lie on shifted design rows; "
                    "model.options.design=fixed takes 1 (or use model.options.design=gaussian)")  # fmt: skip
        if (sample.get("curation_k") or 1) != 1:
            return ("sample.curation_k: curation keeps some rows of a larger draw, off the fixed design; "
                    "model.options.design=fixed takes 1 (or use model.options.design=gaussian)")  # fmt: skip
        for key, what in (("selection", "entropy selection keeps some rows of a larger draw"),
                          ("correction", "a correction replaces rows by others")):  # fmt: skip
            if sample.get(key) is not None:
                return (f"sample.{key}: {what}, off the fixed design; model.options.design=fixed takes null "
                        "(or use model.options.design=gaussian)")  # fmt: skip
        if "kl_truth" in ((run.get("eval") or {}).get("metrics") or []):
            return ("eval.metrics: kl_truth compares joint densities of (x, y), and "
                    "model.options.design=fixed models y given x only; use eval=regression, or "
                    "model.options.design=gaussian")  # fmt: skip
        return None

    # -- parameters ----------------------------------------------------------------------------------------

    def _set(self, w: torch.Tensor, noise_var: torch.Tensor, x_design: torch.Tensor | None,
             x_cov: torch.Tensor | None) -> None:  # fmt: skip
        """Store the parameters (and the covariates' sampling factor); non-finite ones raise Diverged."""
        tensors = [t for t in (w, noise_var, x_design, x_cov) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise Diverged("non-finite linear regression parameters")
        self.w, self.noise_var, self.x_design, self.x_cov = w, noise_var, x_design, x_cov
        self._factor = self._degenerate = None
        if x_cov is not None:
            self._factor, self._degenerate = psd_factor(x_cov)

    def _require(self) -> None:
        if self.w is None:
            raise RuntimeError(
                "LinearRegressionFamily has no parameters yet: call fit() or load_state_dict()"
            )

    def coefficients(self) -> torch.Tensor:
        """w (C, d): what simulator.metrics.regression measures against w*."""
        self._require()
        return self.w

    # -- fit and sample ------------------------------------------------------------------------------------

    def _fit(self, x: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator | None
             ) -> dict[str, Any]:  # fmt: skip
        """Least squares of the last coordinate on the others: w = (X^T P X + ridge I)^{-1} X^T P y with
        P = diag(p), p = 1/N (unweighted) or the normalised weights; a chain whose matrix is singular gets
        the minimum-norm solution (pseudo-inverse)."""
        n, d = x.shape[1], self.features
        xs, y = x[..., :d], x[..., d]
        w_rows = check_weights(weights, self.chains, n)
        if w_rows is None:
            gram = torch.bmm(xs.transpose(1, 2), xs) / n
            moment = torch.bmm(xs.transpose(1, 2), y.unsqueeze(-1)).squeeze(-1) / n
        else:
            p = (w_rows / w_rows.sum(1, keepdim=True)).to(device=x.device, dtype=x.dtype)  # (C, N), sums to 1
            gram = torch.bmm((xs * p.unsqueeze(-1)).transpose(1, 2), xs)
            moment = torch.bmm((xs * p.unsqueeze(-1)).transpose(1, 2), y.unsqueeze(-1)).squeeze(-1)
        system = gram + self.ridge * torch.eye(d, dtype=x.dtype, device=x.device) if self.ridge else gram
        factor, info = torch.linalg.cholesky_ex(system)
        w = torch.cholesky_solve(moment.unsqueeze(-1), factor).squeeze(-1)
        bad = info != 0
        if bool(bad.any()):  # singular X^T X (N < d, repeated rows): the minimum-norm least-squares fit
            w[bad] = (torch.linalg.pinv(system[bad]) @ moment[bad].unsqueeze(-1)).squeeze(-1)
        resid = y - torch.bmm(xs, w.unsqueeze(-1)).squeeze(-1)
        mse = resid.square().mean(1) if w_rows is None else (p * resid.square()).sum(1)
        if self.noise is not None:
            noise_var = torch.full_like(mse, self.noise**2)
        elif self.ridge == 0 and n > d:
            noise_var = mse * (n / (n - d))  # unbiased: RSS / (N - d)
        else:
            noise_var = mse
        design = xs[:, : self.design_rows].clone() if self.design == "fixed" else None
        self._set(w, noise_var, design, gram if self.design == "gaussian" else None)
        return {"mse": float(mse.mean()), "noise_var": float(noise_var.mean())}

    def _sample(self, n: int, generator: torch.Generator, s: float) -> torch.Tensor:
        """(C, n, d + 1): covariates (design row i mod m, or N(0, s Sigma_x)), labels x.w + N(0, s var)."""
        c, d, dev = self.chains, self.features, self.w.device
        if self.x_design is not None:
            rows = torch.arange(n, device=dev) % self.x_design.shape[1]
            xs = self.x_design[:, rows]
        else:
            z = standard_normal((c, n, d), generator, self.dtype, dev)
            xs = torch.bmm(z, self._factor.transpose(1, 2)) * math.sqrt(s)
        e = standard_normal((c, n), generator, self.dtype, dev)
        y = torch.bmm(xs, self.w.unsqueeze(-1)).squeeze(-1) + e * (s * self.noise_var).sqrt().unsqueeze(-1)
        return torch.cat([xs, y.unsqueeze(-1)], dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(C, m): log N(y; x . w, s^2), plus log N(x; 0, Sigma_x) under design=gaussian (-inf for a chain
        whose Sigma_x is singular)."""
        self._require()
        rows = flatten_query(x, self.chains, self.event_shape, self.w)
        xs, y = rows[..., : self.features], rows[..., self.features]
        r = y - torch.bmm(xs, self.w.unsqueeze(-1)).squeeze(-1)
        var = self.noise_var.unsqueeze(-1)
        out = -0.5 * (r.square() / var + var.log() + _LOG_2PI)
        if self.x_cov is None:
            return out
        white = torch.linalg.solve_triangular(self._factor, xs.transpose(1, 2), upper=False)
        logdet = 2.0 * self._factor.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        lx = -0.5 * (self.features * _LOG_2PI + logdet.unsqueeze(1) + white.square().sum(1))
        return (out + lx).masked_fill(self._degenerate.unsqueeze(1), -math.inf)

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (loadable with weights_only=True): w, noise_var and the design (float32 where that
        holds its values exactly, as the data sources' rows) or Sigma_x."""
        if self.w is None:
            return {}
        state = {"w": self.w, "noise_var": self.noise_var}
        if self.x_cov is not None:
            state["x_cov"] = self.x_cov
        state = {k: v.to(self.dtype) for k, v in state.items()}
        if self.x_design is not None:  # the data's float32 rows are kept as such: half the file, same values
            small = self.x_design.float()
            state["x_design"] = (
                small if torch.equal(small.to(self.x_design.dtype), self.x_design) else self.x_design
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore parameters written by state_dict (an empty dict clears them); a model file of the other
        design, or of another size, is refused."""
        if not state:
            self.reset()
            return
        c, d = self.chains, self.features
        need = "x_design" if self.design == "fixed" else "x_cov"
        if need not in state or set(state) - {"w", "noise_var", "x_design", "x_cov"}:
            raise ValueError(f"state has {sorted(state)}; model.options.design={self.design} needs w, "
                             f"noise_var and {need}")  # fmt: skip
        w, var, extra = state["w"], state["noise_var"], state[need]
        shape = (c, extra.shape[1] if extra.dim() == 3 else -1, d) if need == "x_design" else (c, d, d)
        if w.shape != (c, d) or var.shape != (c,) or tuple(extra.shape) != shape:
            raise ValueError(f"state has w {tuple(w.shape)}, noise_var {tuple(var.shape)}, {need} "
                             f"{tuple(extra.shape)}; does not fit {c} chains of d = {d}")  # fmt: skip
        cast = {"dtype": self.dtype, "device": w.device}
        design = extra.to(**cast) if need == "x_design" else None
        self._set(w.to(**cast), var.to(**cast), design, extra.to(**cast) if need == "x_cov" else None)

    def parameters_vector(self) -> torch.Tensor:
        """(C, d): the coefficients w."""
        return self.coefficients()

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Forget the parameters (the closed-form fit never depends on them)."""
        self.w = self.noise_var = self.x_design = self.x_cov = self._factor = self._degenerate = None

    def to(self, device: str | torch.device) -> LinearRegressionFamily:
        """Move the parameters to device (in place) and return self."""
        if self.w is not None:
            moved = [None if t is None else t.to(device) for t in (self.x_design, self.x_cov)]
            self._set(self.w.to(device), self.noise_var.to(device), *moved)
        return self
