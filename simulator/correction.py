"""Self-correction: synthetic samples moved toward the data before they enter a training set.

Gillman et al., ICML 2024 ("Self-correcting self-consuming loops for generative model training"). Their
idealised correction of strength gamma >= 0 replaces the model's law p_theta by the mixture

    pi_gamma p_theta = 1/(1 + gamma) p_theta + gamma/(1 + gamma) p_theta*,

p_theta* the optimal model; their theorem: the larger gamma, the more synthetic data a retraining loop
tolerates while staying stable, at a faster contraction. As a sample-level operation this is: each synthetic
row x is replaced, independently with probability w = gamma/(1 + gamma), by its correction c(x). The
corrections (`sample.correction`):

- truth:  c(x) is a fresh draw of the exact truth (toy data): the idealised correction with p_theta* the
          truth itself (their Gaussian toy's target).
- kmeans: c(x) is the nearest of K k-means centroids of the real training set, per class for a class-
          conditional family (their MNIST setting: K = 16 per digit, every sample corrected,
          gamma = infinity); the centroids are fitted once per chain, seeded, and rounded to the
          data's integer type for images.
- a callable from Python: c(x (C, m, *event), labels (C, m) or None, generator) -> (C, m, *event).

`sample.correction_strength` is gamma (null: infinity, every row corrected). The correction acts when a
training set D_t reads S_g's rows (simulator.samples.SamplePool.member), never on the saved S_g: the
metrics see the model's own samples. Its draws come from the stream (seed, g, "correction"), so a row of
S_g is corrected alike in every D_t that reads it, after a resume and however S_g was sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from simulator import seeding
from simulator.data.base import Dataset
from simulator.options import ConfigError, problem
from simulator.policies import draw_truth

CORRECTIONS = ("truth", "kmeans")
OPTIONS: dict[str, dict[str, Any]] = {  # each correction's options (sample.correction_options), defaults
    "truth": {},
    "kmeans": {"k": 16, "per_class": True, "iterations": 100},
}

# correct(x (C, m, *event), labels (C, m) or None, generator) -> corrected x, the same shape
Correct = Callable[[torch.Tensor, "torch.Tensor | None", torch.Generator], torch.Tensor]


def share(strength: float | None) -> float:
    """w = gamma/(1 + gamma): the probability that a row is corrected (gamma None: infinity, w = 1)."""
    return 1.0 if strength is None or math.isinf(strength) else strength / (1.0 + strength)


def check(
    name: Any, strength: Any, options: Any, *, source: Any, exact_sampler: bool, num_classes: Any
) -> None:
    """One ConfigError line for a correction the config cannot run (the config's check walk calls this)."""
    if name is None:
        for key, value in (("correction_strength", strength), ("correction_options", options or None)):
            if value is not None:
                raise ConfigError(
                    f"sample.{key}: set without sample.correction (one of {', '.join(CORRECTIONS)})"
                )
        return
    if name not in CORRECTIONS:
        raise ConfigError(problem("sample.correction", f"one of {', '.join(CORRECTIONS)} or null", name))
    if strength is not None and (
        isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0
    ):
        raise ConfigError(
            problem("sample.correction_strength", "a number gamma >= 0 or null (infinity)", strength)
        )
    read_options(name, options)
    if name == "truth" and not exact_sampler:
        raise ConfigError(
            f"sample.correction: truth needs a data source with an exact sampler (a toy source), "
            f"not data.source={source}"
        )
    if name == "kmeans" and read_options(name, options)["per_class"] and num_classes is None:
        raise ConfigError(
            "sample.correction_options.per_class: per-class centroids need a class-conditional "
            "model (model.options.num_classes); set per_class: false for one set of centroids"
        )


def check_data(name: Any, options: Any, data: Dataset, source: Any) -> None:
    """One ConfigError line for a correction the opened data cannot serve (labels for per-class k-means)."""
    if name != "kmeans":
        return
    opts = read_options(name, options)
    if opts["per_class"] and data.train_labels is None:
        raise ConfigError(
            f"sample.correction_options.per_class: data.source={source} has no class labels; set "
            "per_class: false"
        )
    fewest = data.n_train if not opts["per_class"] else int(torch.bincount(data.train_labels[0]).min())
    if opts["k"] > fewest:
        raise ConfigError(
            problem(
                "sample.correction_options.k",
                f"at most the {fewest} real rows of the smallest class",
                opts["k"],
            )
        )


def read_options(name: str, options: Any) -> dict[str, Any]:
    """The correction's options over its defaults; an unknown key or a bad value is one line."""
    given = dict(options or {})
    if not isinstance(options or {}, Mapping):
        raise ConfigError(problem("sample.correction_options", "a mapping", options))
    unknown = sorted(set(given) - set(OPTIONS[name]))
    if unknown:
        allowed = ", ".join(OPTIONS[name]) or "none"
        raise ConfigError(
            f"sample.correction_options.{unknown[0]}: not an option of correction {name} (allowed: {allowed})"
        )
    out = {**OPTIONS[name], **given}
    for key in ("k", "iterations"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1):
            raise ConfigError(problem(f"sample.correction_options.{key}", "an integer >= 1", out[key]))
    if "per_class" in out and not isinstance(out["per_class"], bool):
        raise ConfigError(problem("sample.correction_options.per_class", "true or false", out["per_class"]))
    return out


# -- k-means, seeded and batched over nothing but plain loops: fitted once per run -----------------------


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """(k, D) centroids of the rows of x (n, D) by Lloyd's algorithm from a k-means++ start (float64)."""
    x = x.double()
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to d^2
        total = float(d2.sum())
        if total > 0:
            i = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # duplicates only: any row
            i = int(torch.randint(len(x), (1,), generator=generator))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(-1))
    c = torch.stack(centres)
    assign = None
    for _ in range(iterations):
        new = torch.cdist(x, c).argmin(-1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):  # an empty cluster keeps its centre
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c


class Corrector:
    """A run's correction: built once by the sample pool, applied to S_g's rows as D_t reads them."""

    def __init__(self, name: str | Correct, strength: float | None, options: Any, data: Dataset, seed: int):
        self.name, self.w, self.data, self.seed = name, share(strength), data, seed
        self.options = read_options(name, options) if isinstance(name, str) else dict(options or {})
        self.centroids: list[dict[int, torch.Tensor]] | None = None  # per chain: class (-1: all) -> (K, D)

    def _fit(self) -> list[dict[int, torch.Tensor]]:
        """k-means of each chain's real training set (per class where asked), from (seed, "correction",
        "kmeans", chain, class): the paper's centroids, fitted once."""
        k, per_class, its = self.options["k"], self.options["per_class"], self.options["iterations"]
        train = self.data.train.flatten(2)
        out = []
        for c in range(train.shape[0]):
            labels = (
                self.data.train_labels[min(c, self.data.train_labels.shape[0] - 1)] if per_class else None
            )
            groups = (
                {-1: train[c]} if labels is None else {int(y): train[c][labels == y] for y in labels.unique()}
            )
            out.append(
                {
                    y: kmeans(rows, k, seeding.generator(self.seed, "correction", "kmeans", c, y), its)
                    for y, rows in groups.items()
                }
            )
        return out

    def _nearest(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Each row's nearest centroid (of its chain, and of its class when per class), in x's dtype."""
        if self.centroids is None:
            self.centroids = self._fit()
        flat = x.flatten(2).double()
        out = torch.empty_like(flat)
        for c in range(x.shape[0]):
            table = self.centroids[min(c, len(self.centroids) - 1)]
            if -1 in table:
                out[c] = table[-1][torch.cdist(flat[c], table[-1]).argmin(-1)]
                continue
            for y, centres in table.items():
                rows = labels[c] == y
                if rows.any():
                    out[c, rows] = centres[torch.cdist(flat[c, rows], centres).argmin(-1)]
            missing = ~torch.isin(labels[c], torch.tensor(sorted(table), dtype=labels.dtype))
            out[c, missing] = flat[c, missing]  # a class the real set lacks: left as drawn
        if not x.is_floating_point():  # images: rounded back to their integer type (uint8)
            info = torch.iinfo(x.dtype)
            out = out.round().clamp(info.min, info.max)
        return out.to(x.dtype).reshape(x.shape)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None, g: int) -> torch.Tensor:
        """S_g's rows x (C, m, *event) as D_t reads them: each replaced by its correction w.p. w."""
        if self.w == 0:
            return x
        chains, m = x.shape[:2]
        if self.name == "truth":
            assert self.data.truth is not None  # refused by the config's check otherwise
            fixed = draw_truth(self.data.truth, m, chains, seeding.derive_seed(self.seed, "correction"), g)
        elif isinstance(self.name, str):  # kmeans
            fixed = self._nearest(x, labels)
        else:  # a user's correction, with its own stream
            fixed = self.name(x, labels, seeding.generator(self.seed, g, "correction", "user"))
            if fixed.shape != x.shape:
                raise ValueError(
                    f"sample.correction: the correction returned {tuple(fixed.shape)} for "
                    f"{tuple(x.shape)} rows"
                )
        fixed = fixed.to(dtype=x.dtype, device=x.device)
        if self.w == 1:
            return fixed
        u = torch.rand(
            chains, m, generator=seeding.generator(self.seed, g, "correction"), dtype=torch.float64
        )
        keep = (u < self.w).reshape(chains, m, *([1] * (x.dim() - 2)))
        return torch.where(keep.to(x.device), fixed, x)


def make(
    name: str | Correct | None, strength: float | None, options: Any, data: Dataset, seed: int
) -> Corrector | None:
    """The pool's corrector (None: no correction)."""
    return None if name is None else Corrector(name, strength, options, data, seed)


# -- the closed form: the Gaussian family under replace with the idealised (truth) correction -------------


def gaussian_expected(
    n: int, n0: int, gamma: float | None, generations: int, tr_sigma0: float = 1.0, ddof: int = 0
) -> dict[str, list[float]]:
    """E[tr Sigma_t] and E||mu_t - mu_0||^2 for t = 0..generations: a Gaussian fitted (ddof 0 or 1) to
    n_0 real rows of N(mu_0, Sigma_0) at generation 0, then to n rows of S_{t-1} each replaced with
    probability w = gamma/(1 + gamma) by a fresh draw of the truth (policy=replace,
    sample.correction=truth). Exact at every n: the rows are i.i.d. from the mixture, whose covariance
    is (1 - w) Sigma + w Sigma_0 + w (1 - w) e e^T (e = mu - mu_0), so with u that mixture's expected trace

        E[tr Sigma_t]       = (n - 1)/(n - ddof) u_t
        E||mu_t - mu_0||^2  = u_t / n + (1 - w)^2 E||mu_{t-1} - mu_0||^2,
        u_t = (1 - w) E[tr Sigma_{t-1}] + w tr Sigma_0 + w (1 - w) E||mu_{t-1} - mu_0||^2.

    w = 0 gives replace's own forms (E tr Sigma_t = a^t ..., the mean a random walk); for w > 0 both tend
    to a fixed point: the loop is stable, as Gillman et al.'s theorem says."""
    w = share(gamma)
    a, a0 = (n - 1) / (n - ddof), (n0 - 1) / (n0 - ddof)
    v, m = [a0 * tr_sigma0], [tr_sigma0 / n0]
    for _ in range(generations):
        u = (1 - w) * v[-1] + w * tr_sigma0 + w * (1 - w) * m[-1]
        v.append(a * u)
        m.append(u / n + (1 - w) ** 2 * m[-1])
    return {"trace": v, "mean_error": m}
