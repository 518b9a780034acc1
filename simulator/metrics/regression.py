"""regression_risk: the test error of a linear regression against the w* of data=linear_regression.

- `excess_risk` = ||w_t - w*||^2_Sigma = (w_t - w*)^T Sigma (w_t - w*), Sigma the covariates' true covariance:
  the expected squared error on a new row minus the noise floor sigma^2 -- E_test of Gerstgrasser et al.
  (2024) and Dohmatob et al. (2025), exact from the fitted coefficients.
- `test_mse` = mean over the held-out test rows of (y - x . w_t)^2: its Monte Carlo estimate plus sigma^2
  (expectation sigma^2 + excess_risk over the test draw).

A family without coefficients (`coefficients()`: simulator.models.regression) writes neither column.
"""

from __future__ import annotations

import torch

from simulator.metrics.registry import MetricContext, register

CHAINS_PER_CHUNK = 1024  # test predictions (n_test, chains) are made this many chains at a time


@register("regression_risk", columns=("excess_risk", "test_mse"), needs=("regression",),
          about="the test error of a linear regression against w*")  # fmt: skip
def regression_risk(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """excess_risk ||w - w*||^2_Sigma and test_mse on the held-out rows, per chain."""
    coefficients = getattr(ctx.model, "coefficients", None)
    if coefficients is None:
        return {}
    w = coefficients().detach().double().cpu()  # (C, d)
    params = ctx.data.truth.params  # the need "regression" says they are there
    w_star, cov = params["w_star"].double().cpu(), params["x_cov"].double().cpu()
    if w.shape[1] != w_star.shape[0]:
        raise ValueError(f"regression_risk: the model has {w.shape[1]} coefficients, the data {len(w_star)}")
    delta = w - w_star
    excess = ((delta @ cov) * delta).sum(-1)
    test = ctx.data.test.double().cpu()
    xs, y = test[:, :-1], test[:, -1]
    mse = torch.cat([(y.unsqueeze(1) - xs @ w[i : i + CHAINS_PER_CHUNK].T).square().mean(0)
                     for i in range(0, w.shape[0], CHAINS_PER_CHUNK)])  # fmt: skip
    return {"excess_risk": excess, "test_mse": mse}
