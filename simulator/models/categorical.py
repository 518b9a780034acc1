"""Categorical family: a distribution over V tokens fitted by counts, for C independent chains at once.

The statistical language model of the discrete collapse results (Shumailov et al. 2024's discrete chain,
Seddik et al. 2024's next-token model, Dohmatob et al. 2024's tail cutting): p(i) = (c_i + a) / (n + V a),
c_i the (weighted) count of token i among the chain's n training rows and a the additive smoothing (0:
maximum likelihood, the absorbing chain). Sampling decodes p as a language model does, in this order:
temperature s (p^(1/s), renormalised; s = 0 is greedy, the most probable token, the lowest id among ties),
then top-k (the k most probable tokens) and top-p (the smallest set of most probable tokens holding at
least top_p of the mass), each renormalised. log_prob is the fitted p's, not the decoded one's.

Tokens are float32 ids of shape (C, n, 1) (simulator/data/tokens.py); every chain's probabilities are one
row of a (C, V) float64 tensor, so fit is one scatter-add and sample one inverse-CDF lookup per row.
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
    refuse,
)
from simulator.models.gaussian import check_chains

F64 = torch.float64
MAX_VOCAB = 2**24  # token ids are float32 numbers: every integer up to 2^24 is exact


def token_ids(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """The int64 ids (..., n) of rows x (..., n, 1) that are token ids in [0, vocab); ValueError otherwise
    (the data of another source: real numbers, or a larger vocabulary)."""
    if x.dim() < 2 or x.shape[-1] != 1:
        raise ValueError(f"expected token ids of shape (..., n, 1), got {tuple(x.shape)}")
    v = x[..., 0]
    if v.is_floating_point():
        bad = (v != v.round()) | (v < 0) | (v >= vocab)  # NaN compares unequal: bad
    else:
        bad = (v < 0) | (v >= vocab)
    if bool(bad.any()):
        first = v[bad][0].item()
        raise ValueError(f"rows must be token ids, integers in [0, {vocab}), got {first!r}")
    return v.long()


def decode(
    probs: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The sampling distribution (C, V) of probs (C, V): temperature, then top-k, then top-p, renormalised.

    Ties are broken toward the lower token id (a stable sort), so top_k keeps exactly k tokens (fewer when
    fewer have mass) and top_p the smallest prefix of the sorted tokens whose mass reaches top_p."""
    p = probs.to(F64)
    if temperature == 0:  # greedy: all the mass on the most probable token
        return torch.zeros_like(p).scatter_(1, p.argmax(1, keepdim=True), 1.0)
    if temperature != 1:
        logits = p.log() / temperature  # log 0 = -inf stays -inf: no token gains mass
        p = torch.softmax(logits, dim=1)
    if top_k is None and top_p is None:
        return p
    order = torch.sort(p, dim=1, descending=True, stable=True)
    keep = order.values > 0
    if top_k is not None:
        keep[:, top_k:] = False
    if top_p is not None:
        before = torch.cumsum(order.values, 1) - order.values  # the mass of the tokens ranked above
        keep &= before < top_p * order.values.sum(1, keepdim=True)
    kept = torch.where(keep, order.values, torch.zeros_like(order.values))
    out = torch.zeros_like(p).scatter_(1, order.indices, kept)
    return out / out.sum(1, keepdim=True)


class CategoricalFamily:
    """p over V tokens fitted by (weighted) counts with additive smoothing; sampled with temperature, top-k
    and top-p; exact log_prob. Chains are rows of one (C, V) tensor."""

    exact_likelihood = True
    TOKEN_DATA = True  # its rows are token ids in [0, vocab) (simulator.checks refuses other data)
    # rules beyond the annotations and options.BOUNDS
    OPTIONS = {
        "vocab": {"low": 2, "high": MAX_VOCAB},
        "smoothing": {"low": 0},
        "top_k": {"low": 1},
        "top_p": {"low": 0, "high": 1, "strict": True},
    }
    EXAMPLE = Example(chains=3, event_shape=(1,), options={"vocab": 7, "smoothing": 0.0}, tokens=7)

    def __init__(
        self,
        *,
        chains: int,
        event_shape: tuple[int, ...],
        vocab: int | None = None,
        smoothing: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        check_options(CategoricalFamily, locals())  # each option: its type, bounds and choices (OPTIONS)
        self.chains, self.event_shape, _ = check_chains(chains, event_shape)
        if self.event_shape != (1,):
            raise refuse("event_shape", "(1,): one token id per row (data=tokens)", event_shape)
        if vocab is None:
            raise refuse(
                "model.options.vocab",
                "the vocabulary size, an integer >= 2 (data=tokens sets it from data.options.vocab)",
                vocab,
            )
        if not math.isfinite(float(smoothing)):
            raise refuse("model.options.smoothing", "a finite number >= 0", smoothing)
        self.vocab, self.smoothing = int(vocab), float(smoothing)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        self.probs: torch.Tensor | None = None  # (C, V) float64, each row sums to 1

    @classmethod
    def from_probs(cls, probs: torch.Tensor, **options: Any) -> CategoricalFamily:
        """A family already holding probs (C, V) (a known truth, or a start): options as the constructor's."""
        if probs.dim() != 2:
            raise ValueError(f"need probs (C, V), got {tuple(probs.shape)}")
        model = cls(chains=probs.shape[0], event_shape=(1,), vocab=probs.shape[1], **options)
        model._set(probs.to(F64))
        return model

    def _set(self, probs: torch.Tensor) -> None:
        if not bool(torch.isfinite(probs).all()):
            raise Diverged("non-finite token probabilities")
        self.probs = probs

    def _require(self) -> torch.Tensor:
        if self.probs is None:
            raise RuntimeError(
                "CategoricalFamily has no parameters yet: call fit() or load_state_dict() first"
            )
        return self.probs

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
        """Counts of the ids in data (C or 1, n, 1), weighted by weights (C, n) or (n,) (rows of weight w
        count w times: integer weights are the fit to repeated rows), plus `smoothing` per token;
        labels, steps, generator and progress are unused (an exact fit)."""
        ids = token_ids(broadcast_chains(data, self.chains, 1), self.vocab)  # (C, n)
        n = ids.shape[1]
        if n < 1:
            raise ValueError("need at least one token per chain")
        w = check_weights(weights, self.chains, n)  # None: equal weights, the unweighted fit bit for bit
        mass = torch.ones(ids.shape, dtype=F64, device=ids.device) if w is None else w.to(ids.device)
        counts = torch.zeros(self.chains, self.vocab, dtype=F64, device=ids.device)
        counts.scatter_add_(1, ids, mass)
        counts += self.smoothing
        self._set(counts / counts.sum(1, keepdim=True))
        # mean training log-likelihood, each row by its weight: sum_i p_i-weighted log p(x_i) per chain
        rows = torch.gather(self.probs, 1, ids).log()
        ll = (rows * mass).sum(1) / mass.sum(1)
        return {"log_likelihood": float(ll.mean()), "support": float((self.probs > 0).sum(1).double().mean())}

    def sampling_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """The distribution (C, V) sample() draws from at temperature: decode(probs, temperature, top_k,
        top_p)."""
        return decode(self._require(), check_temperature(temperature), self.top_k, self.top_p)

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw (C, n, 1) float32 token ids from the decoded distribution (see decode), one float64 uniform
        per token made on the generator's device (the inverse CDF of each chain's row)."""
        q = self.sampling_probs(temperature)
        cdf = torch.cumsum(q, 1)
        u = torch.rand(self.chains, int(n), generator=generator, dtype=F64, device=generator.device)
        u = u.to(cdf.device) * cdf[:, -1:]
        ids = torch.searchsorted(cdf, u, right=True).clamp_max_(self.vocab - 1)
        return ids.to(torch.float32).unsqueeze(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) (C, m) of ids x (C, m, 1) or (m, 1) under the fitted p; -inf for a token of zero mass or
        a value that is not a token id of the vocabulary."""
        probs = self._require()
        v = broadcast_chains(x, self.chains, 1)[..., 0].to(probs.device)
        valid = (v == v.round()) & (v >= 0) & (v < self.vocab)
        ids = torch.where(valid, v, torch.zeros_like(v)).long()
        out = torch.gather(probs, 1, ids).log()
        return out.masked_fill(~valid, -math.inf)

    def state_dict(self) -> dict[str, Any]:
        """{"probs": (C, V) float64} (loadable with weights_only=True); empty before a fit."""
        return {} if self.probs is None else {"probs": self.probs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (an empty dict clears the parameters)."""
        if not state:
            self.reset()
            return
        probs = state["probs"]
        if tuple(probs.shape) != (self.chains, self.vocab):
            raise ValueError(f"state has probs {tuple(probs.shape)}; expected ({self.chains}, {self.vocab})")
        self._set(probs.to(F64))

    def parameters_vector(self) -> torch.Tensor:
        """(C, V): the probabilities."""
        return self._require()

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Forget the parameters (the fit by counts never depends on them)."""
        self.probs = None

    def to(self, device: str | torch.device) -> CategoricalFamily:
        """Move the parameters to device (in place) and return self."""
        if self.probs is not None:
            self.probs = self.probs.to(device)
        return self
