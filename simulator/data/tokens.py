"""Token data: a distribution over a vocabulary of V tokens, the discrete target of the collapse theory.

`tokens` is p(i) for token ids i = 0 .. V-1: `law: uniform` (p = 1/V) or `law: zipf` (p(i) proportional to
(i + 1)^(-exponent): token 0 the most frequent, the long tail of Dohmatob et al. 2024's "tale of tails").
It has an exact sampler and an exact log-probability, so the toy metrics that need them (kl_truth, nll) and
`policy=fresh policy.source=truth` work, and the token metrics (simulator/metrics/tokens.py) read the exact
probabilities from the truth (`Truth.params["probs"]`, float64).

Representation: a token is one row of one coordinate, its id as a float32 number (exact up to 2^24), so a
data set is (C, n, 1) like every vector source's (C, n, d) and runs through the loop, the policies and the
sample files unchanged; the categorical family (simulator/models/categorical.py) reads the ids back.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simulator.data.toy import F64, ToySource, _error, _options
from simulator.options import check, choose, options_schema

LAWS = ("uniform", "zipf")
MAX_VOCAB = 2**24  # token ids are float32 numbers: every integer up to 2^24 is exact


def token_probs(vocab: int, law: str = "zipf", exponent: float = 1.0) -> torch.Tensor:
    """The exact probabilities (vocab,) float64 of a token law: uniform, or zipf (i + 1)^(-exponent)."""
    if law == "uniform":
        return torch.full((vocab,), 1.0 / vocab, dtype=F64)
    weights = torch.arange(1, vocab + 1, dtype=F64).pow(-float(exponent))
    return weights / weights.sum()


class TokenSource(ToySource):
    """p(i), i = 0 .. vocab-1, uniform or Zipf(exponent); samples are float32 token ids of shape (n, 1)."""

    name = "tokens"
    dim = 1
    # rules beyond the annotations and options.BOUNDS
    OPTIONS = {"vocab": {"low": 2, "high": MAX_VOCAB}, "law": {"choices": LAWS}, "exponent": {"low": 0}}

    def __init__(self, *, vocab: int = 100, law: str = "zipf", exponent: float = 1.0) -> None:
        _options(TokenSource, vocab=vocab, law=law, exponent=exponent)
        if not math.isfinite(float(exponent)):
            raise _error("exponent", f"must be finite, got {exponent!r}")
        self.vocab, self.law, self.exponent = int(vocab), str(law), float(exponent)
        self.probs = token_probs(self.vocab, self.law, self.exponent)  # (V,) float64, sums to 1
        self._cdf = torch.cumsum(self.probs, 0)
        self._log_probs = self.probs.log()

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n i.i.d. ids by the inverse CDF in float64 (one uniform each), as float32 (n, 1)."""
        dev = generator.device
        if self.law == "uniform":
            ids = torch.randint(0, self.vocab, (n,), generator=generator, device=dev)
        else:
            u = torch.rand(n, generator=generator, dtype=F64, device=dev)
            ids = torch.searchsorted(self._cdf.to(dev), u * self._cdf[-1].item(), right=True)
            ids = ids.clamp_max(self.vocab - 1)
        return ids.to(torch.float32).unsqueeze(-1)

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        """log p(id) of ids x (..., 1); -inf for a value that is not a token id of the vocabulary."""
        v = x[..., 0]
        valid = (v == v.round()) & (v >= 0) & (v < self.vocab)
        ids = torch.where(valid, v, torch.zeros_like(v)).long()
        out = self._log_probs.to(x.device)[ids]
        return out.masked_fill(~valid, -math.inf)

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(self.vocab, dtype=F64)
        mean = (self.probs * ids).sum()
        var = (self.probs * (ids - mean) ** 2).sum()
        return mean.reshape(1), var.reshape(1, 1)

    def truth(self) -> Any:
        """ToySource's truth, with the exact probabilities in float64 (params["probs"], (V,))."""
        out = super().truth()
        assert out.params is not None
        out.params["probs"] = self.probs.clone()
        return out


TOKEN_SOURCES: dict[str, type[ToySource]] = {cls.name: cls for cls in (TokenSource,)}


def make_tokens(name: str, **options: Any) -> ToySource:
    """The token source called name, built from options; one-line ValueError for unknown names or options."""
    cls = TOKEN_SOURCES[choose("data.name", name, TOKEN_SOURCES)]
    check("data", options_schema(cls), options)  # type: ignore[arg-type]  # a class is hashable
    return cls(**options)
