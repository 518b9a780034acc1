"""Model collapse in linear regression reproduced: Gerstgrasser et al., Dey & Donoho, Dohmatob et al.

Fixed design (runs/regression/*, Gerstgrasser et al. 2024): excess risk ||w_g - w*||^2 per chain
(gen_XXX/chain_metrics.pt) against its exact expectation given each chain's design X (gen_000's model file
holds X): sigma^2 tr((X^T X)^{-1}) times
  replace (g + 1);  accumulate sum_{i<=g+1} 1/i^2 (< pi^2/6);  real_only 1;
  mix (lambda = 1, the real rows plus n relabelled rows on the same X): 1 + V_g,
  V_g = (lambda^2 V_{g-1} + lambda) / (1 + lambda)^2, V_0 = 0 (-> lambda / (1 + 2 lambda) = 1/3),
and over Gaussian designs E tr((X^T X)^{-1}) = d / (n - d - 1). Loop generation g is fit g + 1.
Random design (runs/regression_random/*, Dey & Donoho 2024): the risk ratio E[excess_g] / E[excess_0]
against sum_{i<=g+1} 1/i^2 (accumulate, their augment workflow, -> pi^2/6: an n -> infinity limit) and,
for replace (discard), sum_{k<=g} r^k, r = n / (n - d - 1), exact (random_factor).
Strong collapse (runs/regression_strong/*, Dohmatob et al. 2025): generation 1's excess risk against n,
synthetic fraction p2 = lambda / (1 + lambda) from a generator off by c; each chain's exact expected error
given its real and synthetic covariates, ||A^{-1} B Delta||^2 + sigma^2 tr A^{-1}, the floor p2^2 c^2
(E[A^{-1} B] = p2 I, Jensen) and the real-only sigma^2 d / (n - d - 1).
Every interval is a 95% Student-t interval over chains (simulator.stats.student_t_band); a z-score is
(measured - closed form) / SE over chains.

Usage: python experiments/regression/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from simulator import registry
from simulator.stats import student_t_band

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

PI2_6 = math.pi**2 / 6
COLORS = {"replace": "C3", "accumulate": "C0", "mix": "C2", "real_only": "C7"}


def policy_of(run: Run) -> str:
    """replace, accumulate, real_only or mix (lambda > 0)."""
    p = run.config["policy"]
    return "real_only" if p["name"] == "mix" and not p.get("lam") else p["name"]


def factor(policy: str, g: int, lam: float = 1.0) -> float:
    """E[excess_g | X] / (sigma^2 tr (X^T X)^{-1}) under a fixed design (module docstring)."""
    if policy == "replace":
        return g + 1.0
    if policy == "accumulate":
        return sum(1 / i**2 for i in range(1, g + 2))
    if policy == "real_only":
        return 1.0
    v = 0.0
    for _ in range(g):
        v = (lam**2 * v + lam) / (1 + lam) ** 2
    return 1.0 + v


def random_factor(policy: str, g: int, n: int, d: int) -> float:
    """E[excess_g] / E[excess_0] in the random design: accumulate's n -> infinity limit sum 1/i^2 (Dey &
    Donoho); replace exactly sum_{k<=g} r^k, r = n / (n - d - 1): w_g = w_{g-1} + (X_g^T X_g)^{-1} X_g^T e_g
    with X_g drawn from the Gaussian fitted to X_{g-1} (Sigma_{g-1} = X_{g-1}^T X_{g-1} / n), so
    E tr(Sigma (X_g^T X_g)^{-1}) = E tr(Sigma Sigma_{g-1}^{-1}) / (n - d - 1) and E[Sigma_g^{-1}] =
    r E[Sigma_{g-1}^{-1}] (inverse Wishart): the covariates collapse too: geometric growth."""
    if policy == "replace":
        r = n / (n - d - 1)
        return sum(r**k for k in range(g + 1))
    return factor(policy, g)


def z_of(values: np.ndarray) -> float:
    """(mean) / SE over the last axis."""
    return float(values.mean() / (values.std(ddof=1) / math.sqrt(values.size)))


def fixed_design(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "regression")
    fig, axes = common.subplots(1, 2, figsize=(11, 4.4))
    lines = ["## Fixed design (Gerstgrasser et al. 2024)", ""]
    header = [
        "policy",
        "fit",
        "excess risk (95% CI)",
        "closed form given X",
        "z given X",
        "over designs",
        "z",
    ]
    body = []
    for run in sorted(runs, key=lambda r: list(COLORS).index(policy_of(r))):
        policy, cfg = policy_of(run), run.config
        n, d = int(cfg["data"]["n_train"]), int(cfg["data"]["options"]["dim"])
        sigma2 = float(cfg["data"]["options"]["noise"]) ** 2
        lam = float(cfg["policy"].get("lam") or 0.0)
        excess = common.chain_metric(run.path, "excess_risk").astype(np.float64)  # (G + 1, C)
        x = common.models(run.path)[0]["x_design"].double()
        tr_m = torch.linalg.inv(x.transpose(1, 2) @ x).diagonal(dim1=1, dim2=2).sum(-1).numpy()
        gens = np.arange(excess.shape[0])
        label = f"{policy}" + (f" (lambda = {lam:g})" if policy == "mix" else "")
        form = np.array([factor(policy, g, lam) for g in gens]) * sigma2
        for ax in axes if policy != "replace" else axes[:1]:  # right: the bounded ones, zoomed in
            common.band(ax, gens + 1, excess, color=COLORS[policy], label=label)
            ax.plot(gens + 1, form * d / (n - d - 1), "--", color=COLORS[policy], lw=1)
        for g in sorted({0, 1, 4, len(gens) - 1}):
            b = student_t_band(excess[g])
            given = excess[g] - form[g] * tr_m
            over = form[g] * d / (n - d - 1)
            body.append(
                [
                    label,
                    g + 1,
                    f"{b.mean:.4f} ± {b.half:.4f}",
                    f"{float((form[g] * tr_m).mean()):.4f}",
                    f"{z_of(given):+.2f}",
                    f"{over:.4f}",
                    f"{z_of(excess[g] - over):+.2f}",
                ]
            )
    axes[1].axhline(PI2_6 * sigma2 * d / (n - d - 1), color="C0", ls=":", lw=1, label="pi^2/6 x first fit")
    axes[0].plot([], [], "k--", lw=1, label="closed form, sigma^2 d/(n-d-1) x factor")
    axes[0].set(title=f"OLS on its own labels, fixed design (d = {d}, n = {n}, {excess.shape[1]} chains)")
    axes[1].set(title="the bounded policies (95% bands over chains)")
    for ax in axes:
        ax.set(xlabel="fit (generation + 1)", ylabel="excess risk ||w - w*||^2")
        ax.legend(fontsize=8)
    common.save_figure(fig, out / "regression_fixed.png")
    return lines + common.table(header, body) + [""]


def random_design(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "regression_random")
    fig, ax = common.subplots(figsize=(6.4, 4.4))
    lines = ["## Random design (Dey & Donoho 2024)", ""]
    header = ["policy", "fit", "risk ratio (95% CI)", "closed form", "z"]
    body = []
    for run in runs:
        policy = policy_of(run)
        excess = common.chain_metric(run.path, "excess_risk").astype(np.float64)
        gens = np.arange(excess.shape[0])
        first = excess[0].mean()
        ratio = excess.mean(1) / first
        cfg = run.config
        n, d = int(cfg["data"]["n_train"]), int(cfg["data"]["options"]["dim"])
        form = np.array([random_factor(policy, g, n, d) for g in gens])
        # delta method: the ratio's SE from the per-chain linearisation (excess_g - ratio * excess_0) / mean_0
        lin = (excess - ratio[:, None] * excess[0]) / first
        half = student_t_band(lin, axis=1).half  # 95% Student-t over the chains
        ax.plot(gens + 1, ratio, color=COLORS[policy], label=f"{policy} (measured)")
        ax.fill_between(gens + 1, ratio - half, ratio + half, color=COLORS[policy], alpha=0.25, lw=0)
        ax.plot(gens + 1, form, "--", color=COLORS[policy], lw=1, label=f"{policy}: closed form")
        if policy == "replace":  # what a fixed design gives: the covariates' own collapse is the difference
            ax.plot(gens + 1, gens + 1.0, ":", color=COLORS[policy], lw=1, label="replace, fixed design: t")
        for g in sorted({1, 4, len(gens) - 1}):
            z = z_of(excess[g] - form[g] * excess[0])
            body.append([policy, g + 1, f"{ratio[g]:.3f} ± {half[g]:.3f}", f"{form[g]:.3f}", f"{z:+.2f}"])
    ax.axhline(PI2_6, color="k", ls=":", lw=1, label="pi^2/6")
    cfg = runs[0].config
    ax.set(
        xlabel="fit (generation + 1)",
        ylabel="E[excess_t] / E[excess_1]",
        yscale="log",
        title=f"Random design (d = {cfg['data']['options']['dim']}, n = {cfg['data']['n_train']})",
    )
    ax.legend(fontsize=8)
    common.save_figure(fig, out / "regression_random.png")
    return lines + common.table(header, body) + [""]


def strong(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "regression_strong")
    lines = ["## Strong model collapse (Dohmatob et al. 2025)", ""]
    header = [
        "lambda",
        "n",
        "excess risk (95% CI)",
        "exact given X",
        "z given X",
        "floor p2^2 c^2",
        "real only",
    ]
    body, curves = [], {}
    for run in sorted(runs, key=lambda r: (r.config["policy"]["lam"], r.config["data"]["n_train"])):
        cfg = run.config
        n, d, lam = (
            int(cfg["data"]["n_train"]),
            int(cfg["data"]["options"]["dim"]),
            float(cfg["policy"]["lam"]),
        )
        sigma2 = float(cfg["data"]["options"]["noise"]) ** 2
        excess = common.chain_metric(run.path, "excess_risk").astype(np.float64)[1]
        w2 = common.models(run.path)[0]["w"].double()
        data = registry.make_data(OmegaConf.create(cfg))  # the run's real rows, redrawn from its seed
        w_star = data.truth.params["w_star"].double()
        delta = w2 - w_star
        c2 = float(delta.square().sum(1).mean())
        x1 = data.train[..., :d].double()
        gram = x1.transpose(1, 2) @ x1
        b_gram = torch.zeros_like(gram)
        if lam > 0:
            rows = common.generations(run.path)[0] / "samples.pt"
            x2 = torch.load(rows, weights_only=True)[:, : round(lam * n), :d].float().double()
            b_gram = x2.transpose(1, 2) @ x2
        a_inv = torch.linalg.inv(gram + b_gram)
        b = (a_inv @ (b_gram @ delta.unsqueeze(-1))).squeeze(-1)
        exact = (b.square().sum(-1) + sigma2 * a_inv.diagonal(dim1=1, dim2=2).sum(-1)).numpy()
        p2 = lam / (1 + lam)
        band = student_t_band(excess)
        curves.setdefault(lam, []).append((n, band.mean, band.half, float(exact.mean())))
        body.append(
            [
                f"{lam:g}",
                n,
                f"{band.mean:.4f} ± {band.half:.4f}",
                f"{exact.mean():.4f}",
                f"{z_of(excess - exact):+.2f}",
                f"{p2**2 * c2:.4f}",
                f"{sigma2 * d / (n - d - 1):.4f}",
            ]
        )
    fig, ax = common.subplots(figsize=(6.4, 4.4))
    for lam, pts in curves.items():
        ns, mean, half, exact = (np.array(v) for v in zip(*pts, strict=True))
        p2 = lam / (1 + lam)
        name = f"synthetic fraction {p2:.2f}" if lam else "real only"
        ax.errorbar(ns, mean, yerr=half, fmt="o", color="C3" if lam else "C0", label=f"{name} (measured)")
        ax.plot(ns, exact, "-", color="C3" if lam else "C0", lw=1, label=f"{name}: exact given X")
        if lam:
            ax.axhline(p2**2 * c2, color="C3", ls=":", lw=1, label="floor p2^2 c^2")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="real rows n",
        ylabel="excess risk of the mixed fit",
        title=f"Strong model collapse (d = {d}, c^2 = {c2:.2f}, {excess.size} chains)",
    )
    ax.legend(fontsize=8)
    common.save_figure(fig, out / "regression_strong.png")
    return lines + common.table(header, body) + [""]


def main() -> None:
    args = common.arguments(__doc__, out="figures")
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Model collapse in linear regression",
        "",
        "Made by `experiments/regression/run.sh` (`python experiments/regression/analyze.py`).",
        "",
    ]
    lines += (
        fixed_design(args.runs, args.out) + random_design(args.runs, args.out) + strong(args.runs, args.out)
    )
    print(common.write_lines(args.out / "regression.md", lines))


if __name__ == "__main__":
    common.entry(main)
