"""Token metrics: how far each chain's fitted token distribution p_t is from the truth p_0, and what is
left of it (data=tokens; docs/science.md, "Tokens").

Both metrics read p_t(i) = exp(model.log_prob(i)) for every token id i of the vocabulary (the fitted
distribution, not the decoded one sample() draws from) and p_0 = truth.params["probs"] exactly, in float64,
as a (C, V) matrix: no Monte Carlo.

- token_distance: tv_truth = (1/2) sum_i |p_t(i) - p_0(i)|; l2sq_truth = sum_i (p_t(i) - p_0(i))^2 (Seddik
  et al. 2024's squared error: E = (1 - sum p_0^2)(1 - (1 - 1/n)^(t+1)) under replace); kl_tokens =
  KL(p_0 || p_t) (inf once a token of p_0 is lost: counted in kl_tokens_nonfinite); kl_tokens_reverse =
  KL(p_t || p_0) (finite while p_0 has full support).
- token_support: support_size (tokens with p_t > 0: surviving tokens), token_entropy (nats), collision =
  sum_i p_t(i)^2 (Seddik et al.'s S_m), max_prob, lost_mass = sum of p_0 over the tokens p_t lost (the
  test error of a memorising next-token model, Dohmatob et al. 2024), token_tail_mass = p_t's mass on
  p_0's tail: the tokens of rank >= tail_from by p_0 (ties: lower id first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simulator.metrics.registry import MetricContext, read_options, register
from simulator.options import opt

F64 = torch.float64


@dataclass
class TokenMetricOptions:
    """The eval.options token_support reads (null: the default)."""

    tail_from: int | None = opt(None, low=0)  # rank where p_0 tail starts (0: the top token; null: V // 2)


def _probs(ctx: MetricContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_t (C, V), p_0 (V,)), both float64 on the CPU; computed once per generation."""
    if "token_probs" not in ctx.cache:
        truth = ctx.data.truth.params["probs"].to(F64).cpu()  # type: ignore[union-attr]  # needs: tokens
        ids = torch.arange(len(truth), dtype=torch.float32).unsqueeze(-1)  # (V, 1): every token once
        model = ctx.model.log_prob(ids).to(F64).cpu().exp()
        ctx.cache["token_probs"] = (model, truth)
    return ctx.cache["token_probs"]


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x log(x / y) with 0 log 0 = 0 (and x log(x / 0) = inf for x > 0)."""
    return torch.where(x > 0, x * (x.log() - y.log()), torch.zeros_like(x))


@register(
    "token_distance", columns=("tv_truth", "l2sq_truth", "kl_tokens", "kl_tokens_reverse"), needs=("tokens",)
)
def token_distance(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Exact distances between each chain's fitted token distribution and the truth's."""
    p, p0 = _probs(ctx)
    diff = p - p0
    return {
        "tv_truth": diff.abs().sum(1) / 2,
        "l2sq_truth": diff.square().sum(1),
        "kl_tokens": _xlogy(p0.expand_as(p), p).sum(1),
        "kl_tokens_reverse": _xlogy(p, p0.expand_as(p)).sum(1),
    }


@register(
    "token_support",
    columns=("support_size", "token_entropy", "collision", "max_prob", "lost_mass", "token_tail_mass"),
    options=TokenMetricOptions,
    needs=("tokens",),
)
def token_support(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """What is left of each chain's token distribution: support, entropy, collision probability, largest
    probability, the truth's mass on lost tokens and the fitted mass on the truth's tail."""
    opts = read_options(TokenMetricOptions, ctx.options)
    p, p0 = _probs(ctx)
    alive = p > 0
    rank = torch.sort(p0, descending=True, stable=True).indices
    start = len(p0) // 2 if opts.tail_from is None else min(int(opts.tail_from), len(p0))
    tail = rank[start:]
    return {
        "support_size": alive.sum(1).to(F64),
        "token_entropy": -_xlogy(p, torch.ones_like(p)).sum(1),
        "collision": p.square().sum(1),
        "max_prob": p.max(1).values,
        "lost_mass": (p0 * ~alive).sum(1),
        "token_tail_mass": p[:, tail].sum(1),
    }
