"""Linear regression rows (x, y): x ~ N(0, Sigma) in d dimensions, y = x . w* + noise, the setting of the
regression theory of model collapse (Gerstgrasser et al. 2024, Dey & Donoho 2024, Dohmatob et al. 2025).

A row is one vector of d + 1 coordinates, the d covariates first and the label last, so a run's tensors keep
the loop's (chains, n, *event) shape with event (d + 1,), and every policy, the run directory and the vector
metrics see rows as any other vector source's. Each chain draws its own real training set (its own design
X and noise), the test set is shared. The exact joint density is Gaussian: the truth's log_prob, sampler and
parameters ("mean", "cov" of the row; "w_star", "x_cov", "noise" for the regression metric) are exact.

Options: dim (d, default 10), noise (the label noise's standard deviation sigma, default 1), w_norm (||w*||,
default 1; w* = w_norm (1, ..., 1) / sqrt(d)), x_std (the covariates' standard deviations: a number, the
isotropic default 1, or a list of d numbers for a diagonal Sigma).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simulator.data.toy import F64, LOG_2PI, ToySource, _error, _options, _per_item
from simulator.options import check, choose, options_schema


class LinearRegressionSource(ToySource):
    """Rows (x, y) with x ~ N(0, diag(x_std^2)) and y = x . w* + N(0, noise^2), as one (d + 1)-vector."""

    name = "linear_regression"

    def __init__(self, *, dim: int = 10, noise: float = 1.0, w_norm: float = 1.0, x_std: Any = 1.0) -> None:
        _options(LinearRegressionSource, dim=dim, noise=noise, w_norm=w_norm)
        if not (math.isfinite(float(w_norm)) and float(w_norm) >= 0):
            raise _error("w_norm", f"must be a finite number >= 0, got {w_norm!r}")
        std = _per_item("x_std", x_std, dim, "covariate")
        if (std <= 0).any():
            raise _error("x_std", f"must be positive, got {x_std!r}")
        self.features = int(dim)  # d; the row has d + 1 coordinates
        self.dim = self.features + 1
        self.sigma = float(noise)
        self.w_star = torch.full((self.features,), float(w_norm) / math.sqrt(self.features), dtype=F64)
        self.x_std = std

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev = generator.device
        x = torch.randn(n, self.features, generator=generator, device=dev) * self.x_std.to(dev, torch.float32)
        e = torch.randn(n, generator=generator, device=dev) * self.sigma
        y = x.double() @ self.w_star.to(dev) + e.double()
        return torch.cat([x, y.float().unsqueeze(-1)], dim=-1)

    def _log_prob64(self, rows: torch.Tensor) -> torch.Tensor:
        x, y = rows[..., :-1], rows[..., -1]
        std = self.x_std.to(rows.device)
        lx = -0.5 * ((x / std) ** 2).sum(-1) - torch.log(std).sum() - 0.5 * self.features * LOG_2PI
        r = y - x @ self.w_star.to(rows.device)
        ly = -0.5 * (r / self.sigma) ** 2 - math.log(self.sigma) - 0.5 * LOG_2PI
        return lx + ly

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        cov_x = torch.diag(self.x_std**2)
        cxy = cov_x @ self.w_star
        cov = torch.zeros(self.dim, self.dim, dtype=F64)
        cov[:-1, :-1], cov[:-1, -1], cov[-1, :-1] = cov_x, cxy, cxy
        cov[-1, -1] = self.w_star @ cxy + self.sigma**2
        return torch.zeros(self.dim, dtype=F64), cov

    def _extra_params(self) -> dict[str, torch.Tensor]:
        return {"w_star": self.w_star, "x_cov": torch.diag(self.x_std**2),
                "noise": torch.tensor(self.sigma, dtype=F64)}  # fmt: skip


REGRESSION_SOURCES: dict[str, type[ToySource]] = {"linear_regression": LinearRegressionSource}


def make_regression(name: str, **options: Any) -> ToySource:
    """The regression source called name, built from options; one-line error for unknown names or options."""
    cls = REGRESSION_SOURCES[choose("data.name", name, REGRESSION_SOURCES)]
    check("data", options_schema(cls), options)  # type: ignore[arg-type]  # a class is hashable
    return cls(**options)
