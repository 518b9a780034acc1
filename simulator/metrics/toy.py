"""Vector metrics: held-out NLL, KL to the truth, Frechet, MMD, sliced Wasserstein, moments, k-NN PR.

Every metric maps a MetricContext to {column: (C,) float64 CPU tensor}, vectorised over chains and
processed in chunks of chains so that C = 10,000 chains of m = 100 samples against n_test = 1,000
points stays well under 1 GB. The squared quantities (frechet, mmd, sliced_w) are reported squared,
as FID is: their expectations have closed forms, their square roots do not.
The pure functions (frechet_distance, mmd2_unbiased, sliced_w2, knn_precision_recall) take plain
tensors and are reused by the image metrics on extracted features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from simulator.metrics.registry import MetricContext, register
from simulator.options import opt
from simulator.seeding import child

MAX_ELEMS = 2**24  # float64 elements per chunk of chains (128 MiB); options["max_elems"] overrides


@dataclass
class VectorMetricOptions:
    """The eval.options these metrics read (a schema of simulator.options, checked before a run); null is
    an option's default, so configs/eval's vector groups list every option (see FIDOptions)."""

    projections: int | None = opt(64, low=1)  # sliced_w: random directions
    k: int | None = opt(3, low=1)  # knn_pr: neighbours
    max_elems: int | None = opt(MAX_ELEMS, low=1)  # float64 elements per chunk of chains
    mmd_max: int | None = opt(1000, low=1)  # mmd: samples and test rows used at most


# -- helpers ------------------------------------------------------------------------------------


def _chunks(chains: int, per_chain: int, ctx: MetricContext) -> Iterator[slice]:
    """Slices of chains whose per-chain work of per_chain elements fits the memory budget."""
    size = max(1, int(ctx.options.get("max_elems") or MAX_ELEMS) // max(1, per_chain))
    for start in range(0, chains, size):
        yield slice(start, min(start + size, chains))


def _vectors(ctx: MetricContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (C, m, d) and test points (n, d), flattened and in float64 on the samples' device."""
    x = ctx.samples.reshape(ctx.samples.shape[0], ctx.samples.shape[1], -1)
    y = ctx.data.test.reshape(ctx.data.test.shape[0], -1).to(x.device, torch.float64)
    return x, y


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (..., p, q) between rows of a (..., p, d) and b (..., q, d)."""
    # One allocation, then in place: these matrices are the largest tensors of the vector metrics.
    d2 = a @ b.transpose(-1, -2)
    d2.mul_(-2).add_((a * a).sum(-1).unsqueeze(-1)).add_((b * b).sum(-1).unsqueeze(-2))
    return d2.clamp_min_(0)  # the expansion can dip below zero by roundoff


def gaussian_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (..., d) and unbiased covariance (..., d, d) of x (..., n, d)."""
    mu = x.mean(-2)
    xc = x - mu.unsqueeze(-2)
    return mu, xc.transpose(-1, -2) @ xc / (x.shape[-2] - 1)


def _model_log_prob_mean(ctx: MetricContext) -> torch.Tensor:
    """Mean model log-density (C,) over the test points, in chunks of test rows to bound memory; computed
    once per generation (nll, kl_truth and nll_gap all read it)."""
    if "model_test_log_prob" in ctx.cache:
        return ctx.cache["model_test_log_prob"]
    test = ctx.data.test
    chains, d = int(ctx.model.chains), math.prod(test.shape[1:])
    rows = max(1, int(ctx.options.get("max_elems") or MAX_ELEMS) // (chains * d))
    total = torch.zeros(chains, dtype=torch.float64)
    for start in range(0, test.shape[0], rows):
        total += ctx.model.log_prob(test[start : start + rows]).double().sum(-1).cpu()
    ctx.cache["model_test_log_prob"] = total / test.shape[0]
    return ctx.cache["model_test_log_prob"]


# -- pure functions -----------------------------------------------------------------------------


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> torch.Tensor:
    """Squared W2 between N(mu1, cov1) and N(mu2, cov2) (the FID formula), batched over leading dims.

    The cross term tr sqrt(cov1 cov2) is taken in its symmetric form tr sqrt(cov2^{1/2} cov1 cov2^{1/2}),
    computed with eigh in float64: stable for singular covariances, unlike a general matrix square root.
    """
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    w, v = torch.linalg.eigh(cov2)
    root2 = (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)
    inner = root2 @ cov1 @ root2
    inner = (inner + inner.transpose(-1, -2)) / 2  # exact symmetry for eigvalsh
    tr_sqrt = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum(-1)
    trace = torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(cov2, dim1=-2, dim2=-1).sum(-1)
    return ((mu1 - mu2) ** 2).sum(-1) + trace - 2 * tr_sqrt


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Unbiased MMD^2 (C,), kernel exp(-|a-b|^2 / (2 h^2)), of x (C, m, d) against y (n, d) or (C, n, d)."""
    gamma = 1 / (2 * bandwidth**2)
    m, n = x.shape[-2], y.shape[-2]

    def off_diagonal_mean(a: torch.Tensor) -> torch.Tensor:
        # the U-statistic drops the i = j terms (ones up to roundoff): subtract the diagonal itself
        k = _sqdist(a, a).mul_(-gamma).exp_()
        off = k.sum((-1, -2)) - torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)
        return off / (a.shape[-2] * (a.shape[-2] - 1))

    cross = _sqdist(x, y).mul_(-gamma).exp_().sum((-1, -2)) / (m * n)
    return off_diagonal_mean(x) + off_diagonal_mean(y) - 2 * cross


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Squared W2 (C, P) between the projections of x (C, m, d) and y (n, d) or (C, n, d) on P directions.

    Exact W2 between the two empirical 1-D measures for any m and n: the quantile functions are
    step functions, so integrate their squared difference over the merged breakpoints i/m and j/n.
    """
    m, n = x.shape[-2], y.shape[-2]
    lcm = math.lcm(m, n)  # breakpoints as exact integers in units of 1/lcm
    cuts = torch.cat([torch.arange(m) * (lcm // m), torch.arange(n) * (lcm // n)]).unique()
    weights = torch.diff(cuts, append=torch.tensor([lcm])).double() / lcm
    ix, iy = (cuts * m) // lcm, (cuts * n) // lcm  # which order statistic holds on each segment
    px = (x @ directions.T).sort(-2).values.index_select(-2, ix.to(x.device))
    py = (y @ directions.T).sort(-2).values.index_select(-2, iy.to(x.device))
    return ((px - py) ** 2 * weights.to(x.device).unsqueeze(-1)).sum(-2)


def _kth_radius2(x: torch.Tensor, k: int, rows: int) -> torch.Tensor:
    """Squared distance (B, N) from each point of x (B, N, d) to its k-th nearest other point."""
    if x.shape[-2] <= k:
        raise ValueError(f"k-NN radii need more than k = {k} points, got {x.shape[-2]}")
    # the (k+1)-th smallest distance: the point itself is the first
    out = [
        _sqdist(x[:, s : s + rows], x).topk(k + 1, largest=False).values[..., k]
        for s in range(0, x.shape[1], rows)
    ]
    return torch.cat(out, 1)


def knn_precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN precision and recall (C,) (Kynkaanniemi et al. 2019), fake (C, m, d) vs real (n, d) or (C, n, d).

    Precision: fraction of fake points inside some real point's k-NN ball (fidelity).
    Recall: fraction of real points inside some fake point's k-NN ball (coverage).
    Rows are processed `rows` at a time so large feature sets fit in memory.
    """
    real = real.unsqueeze(0) if real.dim() == 2 else real
    # compare squared distances with squared radii: no square root over the large matrices
    real_r2, fake_r2 = _kth_radius2(real, k, rows), _kth_radius2(fake, k, rows)
    inside_real = []  # per fake point: within some real ball
    covered = torch.zeros(fake.shape[0], real.shape[1], dtype=torch.bool, device=fake.device)
    for s in range(0, fake.shape[1], rows):
        dist2 = _sqdist(fake[:, s : s + rows], real)  # (C, rows, n)
        inside_real.append((dist2 <= real_r2.unsqueeze(1)).any(-1))
        covered |= (dist2 <= fake_r2[:, s : s + rows].unsqueeze(-1)).any(1)
    precision = torch.cat(inside_real, 1).double().mean(-1)
    return precision, covered.double().mean(-1)


# -- the memory the preflight bounds: float64 values one chain's matrices hold (m samples, n test rows) --


def _sliced_w_memory(options: dict, m: int, n: int) -> tuple[int, str]:
    p = options.get("projections") or 64
    return (m + n) * p * 2, "eval.options.projections" if p > 64 else "eval.n_samples"


def _mmd_memory(options: dict, m: int, n: int) -> tuple[int, str]:
    r = min(n, options.get("mmd_max") or 1000)  # the test rows used: the bandwidth's r x r distances
    return max(r * r, m * (m + r)), "eval.options.mmd_max" if r * r > m * (m + r) else "eval.n_samples"


def _knn_pr_memory(options: dict, m: int, n: int) -> tuple[int, str]:
    return m * (m + n) * 2, "eval.n_samples"


# -- registered metrics: each declares its columns, options, needs and memory (metrics/registry.py) ---


@register("nll", columns=("nll", "nll_bpd"), options=VectorMetricOptions)
def nll(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Held-out real negative log-likelihood in nats per sample, and in bits per dimension."""
    d = math.prod(ctx.data.test.shape[1:])
    value = -_model_log_prob_mean(ctx)
    return {"nll": value, "nll_bpd": value / (d * math.log(2))}


@register("nll_gap", columns=("nll_gap",), options=VectorMetricOptions)
def nll_gap(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Generalisation gap: held-out NLL minus the NLL of the chain's own real training rows (nats per
    sample). It grows while a model memorises its real set, which KL to the truth alone cannot tell
    from collapse."""
    train = ctx.data.train
    chains = int(ctx.model.chains)
    rows = max(1, int(ctx.options.get("max_elems") or MAX_ELEMS) // (chains * math.prod(train.shape[2:])))
    total = torch.zeros(chains, dtype=torch.float64)
    for start in range(0, train.shape[1], rows):
        total += ctx.model.log_prob(train[:, start : start + rows]).double().sum(-1).cpu()
    return {"nll_gap": total / train.shape[1] - _model_log_prob_mean(ctx)}


@register("kl_truth", columns=("kl_truth",), options=VectorMetricOptions, needs=("exact_density",))
def kl_truth(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Monte Carlo KL(truth || model) over the test points (truth draws); {} without a truth density."""
    truth = ctx.data.truth
    if truth is None or truth.log_prob is None:
        return {}
    if "truth_test_log_prob" not in ctx.data.cache:  # the same every generation: computed once per run
        ctx.data.cache["truth_test_log_prob"] = truth.log_prob(ctx.data.test).double().mean().cpu()
    return {"kl_truth": ctx.data.cache["truth_test_log_prob"] - _model_log_prob_mean(ctx)}


@register("frechet", columns=("frechet",), options=VectorMetricOptions)
def frechet(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Squared W2 between Gaussian fits of each chain's samples and of the test set (FID on raw vectors)."""
    x, y = _vectors(ctx)
    mu_t, cov_t = gaussian_stats(y)
    d = x.shape[-1]
    chunks = _chunks(x.shape[0], x.shape[1] * d + d * d, ctx)
    out = [frechet_distance(*gaussian_stats(x[c].double()), mu_t, cov_t) for c in chunks]
    return {"frechet": torch.cat(out).cpu()}


@register("mmd", columns=("mmd",), options=VectorMetricOptions, memory=_mmd_memory)
def mmd(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Unbiased MMD^2, Gaussian kernel, bandwidth the median test-set distance (the same for all chains)."""
    x, y = _vectors(ctx)
    limit = int(ctx.options.get("mmd_max") or 1000)
    if y.shape[0] > limit:  # subsample the reference once; the same points serve every chain
        g = child(ctx.generator, "mmd")
        y = y[torch.randperm(y.shape[0], generator=g, device=g.device)[:limit].to(y.device)]
    pair = _sqdist(y, y)
    upper = torch.triu_indices(len(y), len(y), offset=1, device=y.device)
    bandwidth = float(pair[upper[0], upper[1]].median().sqrt())
    per_chain = x.shape[1] * (x.shape[1] + y.shape[0])
    out = [mmd2_unbiased(x[c].double(), y, bandwidth) for c in _chunks(x.shape[0], per_chain, ctx)]
    return {"mmd": torch.cat(out).cpu()}


@register("sliced_w", columns=("sliced_w",), options=VectorMetricOptions, memory=_sliced_w_memory)
def sliced_w(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Sliced squared W2 over options["projections"] random unit directions, the same for all chains."""
    x, y = _vectors(ctx)
    g = child(ctx.generator, "sliced_w")
    p = int(ctx.options.get("projections") or 64)
    theta = torch.randn(p, x.shape[-1], generator=g, dtype=torch.float64, device=g.device).to(x.device)
    theta = theta / theta.norm(dim=-1, keepdim=True)
    per_chain = (x.shape[1] + y.shape[0]) * p * 2
    out = [sliced_w2(x[c].double(), y, theta).mean(-1) for c in _chunks(x.shape[0], per_chain, ctx)]
    return {"sliced_w": torch.cat(out).cpu()}


@register("moments", columns=("mean_drift", "cov_drift", "var_ratio"), options=VectorMetricOptions)
def moments(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Mean drift |mu_s - mu_test|, covariance drift |S_s - S_test|_F, variance ratio tr S_s / tr S_test."""
    x, y = _vectors(ctx)
    mu_t, cov_t = gaussian_stats(y)
    cols: dict[str, list[torch.Tensor]] = {"mean_drift": [], "cov_drift": [], "var_ratio": []}
    d = x.shape[-1]
    for c in _chunks(x.shape[0], x.shape[1] * d + d * d, ctx):
        mu, cov = gaussian_stats(x[c].double())
        cols["mean_drift"].append((mu - mu_t).norm(dim=-1))
        cols["cov_drift"].append((cov - cov_t).flatten(1).norm(dim=-1))
        cols["var_ratio"].append(torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / cov_t.trace())
    return {k: torch.cat(v).cpu() for k, v in cols.items()}


@register(
    "knn_pr",
    columns=("precision", "recall"),
    options=VectorMetricOptions,
    space="raw vectors",
    memory=_knn_pr_memory,
)
def knn_pr(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """k-NN precision (fidelity) and recall (coverage) of each chain's samples against the test set."""
    x, y = _vectors(ctx)
    k = int(ctx.options.get("k") or 3)
    per_chain = x.shape[1] * (x.shape[1] + y.shape[0]) * 2
    pairs = [knn_precision_recall(y, x[c].double(), k) for c in _chunks(x.shape[0], per_chain, ctx)]
    return {
        "precision": torch.cat([p for p, _ in pairs]).cpu(),
        "recall": torch.cat([r for _, r in pairs]).cpu(),
    }


@register("param_dist", columns=("param_dist0", "param_dist_star"), needs=("parameters",), reference_fit=True)
def param_dist(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Parameter distances |theta_t - theta_0| and |theta_t - theta*|; {} where parameters are meaningless."""
    theta = ctx.model.parameters_vector()
    if theta is None:
        return {}
    theta = theta.detach().double().cpu()
    out = {}
    for name, ref in (("param_dist0", ctx.params0), ("param_dist_star", ctx.params_star)):
        if ref is not None:
            out[name] = (theta - ref.detach().double().cpu()).norm(dim=-1)
    return out
