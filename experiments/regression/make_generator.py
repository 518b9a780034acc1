"""Dohmatob et al.'s synthetic-data generator for experiments/regression: a model file of the
linear_regression family (design=gaussian) whose coefficients are off the truth by c in a random direction
per chain.

w2 = w* + c u, u uniform on the unit sphere (one per chain, seeded), noise variance sigma^2, covariates
N(0, I): loaded as generation 0 (init.checkpoint), its samples are the synthetic rows of generation 1.

Usage: python experiments/regression/make_generator.py OUT_FILE [--chains 1000] [--dim 5] [--c 1.0]
       [--noise 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from simulator import weights
from simulator.data.regression import LinearRegressionSource


def generator_state(chains: int, dim: int, c: float, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """The state of a LinearRegressionFamily(design=gaussian) holding w2 = w* + c u per chain."""
    w_star = LinearRegressionSource(dim=dim, noise=noise).w_star
    u = torch.randn(chains, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    return {"w": w_star + c * u, "noise_var": torch.full((chains,), noise**2, dtype=torch.float64),
            "x_cov": torch.eye(dim, dtype=torch.float64).expand(chains, dim, dim).clone()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--chains", type=int, default=1000)
    p.add_argument("--dim", type=int, default=5)
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    weights.save(generator_state(args.chains, args.dim, args.c, args.noise, args.seed), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
