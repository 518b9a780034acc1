"""`model.path=statistics`: the Gaussian family's generation loop on sufficient statistics, from the CLI.

Runs in the same run directory format as simulator.loop (gen_XXX/model.safetensors, metrics.json,
chain_metrics.pt, results.jsonl rows with the same metric names, resume after the last committed
generation, bit for bit), but no generation ever holds a sample: G_t is fitted to the drawn
statistics of D_t (simulator.models.gaussian_stats) and the metrics are computed from statistics:

    nll, kl_truth   the model's log-density averaged over the test points is a function of the test
                    set's mean and scatter: the same value the sample path computes
    frechet, moments  functions of the mean and covariance of S_t's first n_eval rows, drawn exactly
    param_dist      parameters only

so every column is distributed as the sample path's. Metrics that need the points themselves (mmd,
sliced_w, knn_pr), curation, weights, from_last, guidance, accumulate_subsample and fresh draws from the
fixed real set are refused with one line (not exact from statistics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from simulator import weights
from simulator.config import ConfigError
from simulator.data.base import Dataset
from simulator.loop import _aggregate
from simulator.metrics.toy import frechet_distance, gaussian_stats
from simulator.models.base import Diverged
from simulator.models.gaussian_stats import F64, StatisticsChains, Stats, fit, log_likelihood
from simulator.policies import Policy
from simulator.rundir import RunDir

METRICS = ("nll", "kl_truth", "frechet", "moments", "param_dist")  # exact from statistics
SAMPLE_METRICS = ("frechet", "moments")  # these read S_t's statistics; the rest only G_t's parameters
LOG_2PI = math.log(2 * math.pi)


def wants_statistics(cfg: DictConfig) -> bool:
    """True when the config asks for the statistics path (model.path=statistics)."""
    return OmegaConf.select(cfg, "model.path", default="samples") == "statistics"


def check(cfg: DictConfig) -> None:
    """One ConfigError line for a model.path=statistics the run cannot take; nothing for the sample path
    (model.path's value itself is checked by the config schema, simulator.config.Model.path)."""
    if not wants_statistics(cfg):
        return
    if cfg.model.family != "gaussian":
        raise ConfigError(
            f"model.path: statistics is exact only for model=gaussian, got {cfg.model.family!r}"
        )
    policy = cfg.policy.name
    if policy == "accumulate_subsample":
        raise ConfigError("policy: accumulate_subsample draws a random subset of fixed points, which their "
                          "statistics do not determine; use model.path=samples")  # fmt: skip
    if policy == "fresh":
        if OmegaConf.select(cfg, "policy.source", default=None) != "truth":
            raise ConfigError("policy: fresh draws its real rows from the fixed real set, which its "
                              "statistics do not determine; use policy.source=truth or "
                              "model.path=samples")  # fmt: skip
        if cfg.data.source != "gaussian":
            raise ConfigError(f"policy.source: fresh truth draws on statistics need data=gaussian, got "
                              f"{cfg.data.source!r}; use model.path=samples")  # fmt: skip
    if cfg.sample.curation_k != 1:
        raise ConfigError("sample.curation_k: curation ranks individual samples, which model.path=statistics "
                          "never draws; use 1 or model.path=samples")  # fmt: skip
    # sample.save is moot (no samples are drawn): accepted and ignored
    unsupported = {  # options of the sample path that statistics cannot reproduce
        "policy.weight_real": "weighted fits",
        "sample.from_last": "samples of several generations",
        "sample.curation_beta": "curation",
        "sample.guidance": "guidance",
    }
    for key, what in unsupported.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not (key == "sample.from_last" and value == 1):
            raise ConfigError(f"{key}: {what} are not drawn by model.path=statistics; use model.path=samples")
    for name in cfg.eval.metrics:
        if name not in METRICS:
            raise ConfigError(f"eval.metrics: {name} needs samples; model.path=statistics computes "
                              f"{', '.join(METRICS)}")  # fmt: skip
    if OmegaConf.select(cfg, "share_gen0", default=None):
        raise ConfigError("share_gen0: not available with model.path=statistics (generation 0 costs nothing)")


def params_vector(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """(C, d + d(d+1)/2): mean and covariance's lower triangle, as GaussianFamily.parameters_vector."""
    rows, cols = torch.tril_indices(mean.shape[1], mean.shape[1])
    return torch.cat([mean, cov[:, rows, cols]], dim=1)


def metrics_from_statistics(
    names: tuple[str, ...], chain: StatisticsChains, evaluated: Stats | None, data: Dataset,
    params0: torch.Tensor | None, params_star: torch.Tensor | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The sample path's metric columns {name: (C,)} for G_t, from statistics alone."""
    test = data.test.reshape(data.test.shape[0], -1).to(F64)
    out: dict[str, torch.Tensor] = {}
    if "nll" in names or "kl_truth" in names:
        # -mean_i log p(y_i) = (d log 2 pi + log det S + tr(S^-1 M) / n) / 2, M = sum_i (y_i - mu)(y_i - mu)^T
        n, d = test.shape
        y = Stats.of(test.unsqueeze(0))
        delta = (y.mean - chain.mean).unsqueeze(-1)
        m = y.scatter + n * delta @ delta.transpose(1, 2)
        factor, info = torch.linalg.cholesky_ex(chain.cov)
        half = torch.linalg.solve_triangular(factor, m, upper=False)
        maha = torch.linalg.solve_triangular(factor, half.transpose(1, 2), upper=False)
        logdet = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        nll = 0.5 * (d * LOG_2PI + logdet + maha.diagonal(dim1=-2, dim2=-1).sum(-1) / n)
        nll = nll.masked_fill(info != 0, math.inf)  # a collapsed chain: log p = -inf, as log_prob says
        if "nll" in names:
            out.update(nll=nll, nll_bpd=nll / (d * math.log(2)))
        truth = data.truth
        if "kl_truth" in names and truth is not None and truth.log_prob is not None:
            out["kl_truth"] = truth.log_prob(data.test).double().mean().cpu() + nll
    if evaluated is not None and any(k in names for k in SAMPLE_METRICS):
        mu_t, cov_t = gaussian_stats(test)
        mu_s, cov_s = evaluated.mean, evaluated.scatter / (evaluated.count - 1)  # unbiased, as gaussian_stats
        if "frechet" in names:
            out["frechet"] = frechet_distance(mu_s, cov_s, mu_t, cov_t)
        if "moments" in names:
            out["mean_drift"] = (mu_s - mu_t).norm(dim=-1)
            out["cov_drift"] = (cov_s - cov_t).flatten(1).norm(dim=-1)
            out["var_ratio"] = cov_s.diagonal(dim1=-2, dim2=-1).sum(-1) / cov_t.trace()
    if "param_dist" in names:
        theta = params_vector(chain.mean, chain.cov)
        for name, ref in (("param_dist0", params0), ("param_dist_star", params_star)):
            if ref is not None:
                out[name] = (theta - ref.to(F64)).norm(dim=-1)
    return out


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def statistics_loop(
    run: RunDir,  # run directory, already locked and config-checked
    data: Dataset,  # real train (C or 1, n, d), test, truth
    make_model: Callable[[], Any],  # builds the GaussianFamily (its ddof and dtype are used)
    policy: Policy,  # replace, mix, accumulate, or fresh with policy.source=truth
    generations: int = 10,  # T: generations after generation 0
    seed: int = 0,  # root of every seed stream (S_t: (seed, t, "sample"), as in the loop)
    init_checkpoint: str | None = None,  # G_0 from this model file instead of the fit to the real data
    n_samples: int | None = None,  # rows of S_t (only their count matters: the rows metrics see)
    temperature: float = 1.0,  # sampling bias s: S_t ~ N(mu_t, s Sigma_t)
    curation_k: int = 1,  # must be 1 (curation needs the samples)
    save_samples: bool = False,  # ignored: there are no samples to keep
    gen0_cache: Path | None = None,  # must be None
    metrics: tuple[str, ...] = (),  # names from METRICS
    eval_samples: int | None = None,  # rows of S_t the metrics see (default: all)
    progress: bool = True,  # tqdm bar over generations
    **unused: Any,  # generation_loop's training and sampling options: a closed-form fit ignores them
) -> list[dict[str, Any]]:
    """Run or resume generations 0..T on statistics in `run`; takes generation_loop's arguments."""
    if curation_k != 1 or gen0_cache is not None or unused.get("init_pretrained"):
        raise ConfigError("model.path=statistics: no curation, share_gen0 or init.pretrained")
    unknown = [k for k in metrics if k not in METRICS]
    if unknown:
        raise ConfigError(
            f"eval.metrics: {unknown[0]} needs samples; statistics compute {', '.join(METRICS)}"
        )
    model = make_model()
    chains, ddof, dtype = int(model.chains), int(model.ddof), model.dtype
    n_real = data.n_train
    n_pool = policy.n_synthetic(n_real)
    n_draw = max(n_pool, n_samples or 0, (eval_samples or 0) if metrics else 0, 1)
    n_eval = min(eval_samples or n_draw, n_draw)  # the rows of S_t the metrics see, as in the loop
    wants_eval = any(k in metrics for k in SAMPLE_METRICS)
    real = Stats.of(data.train.reshape(data.train.shape[0], n_real, -1))
    if real.mean.shape[0] != chains:  # one real set shared by every chain
        real = Stats(real.count, real.mean.expand(chains, -1), real.scatter.expand(chains, -1, -1))
    init = None
    if init_checkpoint:
        state = weights.load(Path(init_checkpoint))
        init = (state["mean"].to(F64).expand_as(real.mean), state["cov"].to(F64).expand_as(real.scatter))
    truth = fresh_n = None
    if policy.name == "fresh":  # policy.source=truth (check() refused the rest)
        truth = (data.truth.params["mean"], data.truth.params["cov"])
        fresh_n = getattr(policy, "n_real", None) or max(n_real // 2, 1)  # Fresh's default: half the set
    chain = StatisticsChains(
        policy.name, real, n_syn=n_pool, ddof=ddof, temperature=float(temperature),
        n_eval=n_eval if wants_eval else None, fresh_n=fresh_n, truth=truth, init=init, seed=seed,
    )  # fmt: skip

    done = run.repair()
    rows = run.rows()
    if rows and rows[-1].get("status") == "diverged":
        return rows
    params0 = params_star = None
    if done:  # the committed state continues the run exactly
        chain.load_state_dict(_load(run.gen_dir(done[-1]) / "statistics.pt"))
        first = _load(run.gen_dir(0) / "statistics.pt")
        params0 = params_vector(first["mean"], first["cov"])
        star = run.gen_dir(0) / "params_star.pt"
        params_star = _load(star) if star.exists() else params0
    bar = tqdm(range(len(done), generations + 1), desc="generations", disable=not progress,
               initial=len(done), total=generations + 1)  # fmt: skip
    for t in bar:
        tmp = run.begin(t)
        row: dict[str, Any] = {"generation": t, "status": "ok", "policy": policy.describe()}
        clock = time.perf_counter()
        try:
            n_train = chain.fit(t)
        except Diverged as e:
            row.update(status="diverged", error=str(e))
            run.commit(t, row, status="diverged")
            rows.append(row)
            break
        if n_train:
            ll = float(log_likelihood(chain.cov, n_train, ddof).mean())  # GaussianFamily.fit's closed form
            stats: dict[str, Any] = {"log_likelihood": ll, "path": "statistics"}
        else:
            stats = {"loaded": str(init_checkpoint), "path": "statistics"}
        row.update(n_train=n_train, train=stats, seconds_fit=time.perf_counter() - clock)
        clock = time.perf_counter()
        evaluated = chain.draw(t)
        row["seconds_sample"] = time.perf_counter() - clock
        torch.save(chain.state_dict(), tmp / "statistics.pt")
        weights.save({"mean": chain.mean.to(dtype), "cov": chain.cov.to(dtype)}, tmp / weights.SAFETENSORS)

        clock = time.perf_counter()
        if t == 0:
            params0 = params_star = params_vector(chain.mean, chain.cov)
            if init is not None and "param_dist" in metrics:  # theta*: the fit to the real data
                params_star = params_vector(*fit(real, ddof)[:2])
                torch.save(params_star, tmp / "params_star.pt")
        values = metrics_from_statistics(metrics, chain, evaluated, data, params0, params_star)
        row.update(_aggregate(values))
        row["seconds_eval"] = time.perf_counter() - clock
        if chains > 1 and values:
            torch.save({k: v.detach().cpu() for k, v in values.items()}, tmp / "chain_metrics.pt")
        run.commit(t, row, status="complete" if t == generations else "running")
        rows.append(row)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in list(values)[:2]})
    return rows
