"""Shumailov et al. (Nature 2024) reproduced: figures and tables from the run directories alone.

Gaussian (runs/shumailov/*): per chain, the fitted mean and variance of every generation come
from gen_XXX's model file; their chain means (with 95% Student-t intervals over the 1000 chains,
simulator.stats.student_t_band: every ± and band here) are drawn over the closed forms of
stability.gaussian_expected; the z-score (measured - closed form) / SE is a test statistic, not an
interval. Loop generation g is fit t = g + 1.
GMM (runs/shumailov_gmm/base): per chain, both components' covariances and weights from
gen_XXX's model file: the log-determinants collapse and components are lost.

Usage: python experiments/shumailov/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from simulator.models.gmm import GMMFamily
from simulator.stability import gaussian_expected
from simulator.stats import student_t_band

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

CHECK_T = (10, 100, 1000)  # fits reported in the table
Z = 5.0  # |z| above which a row is flagged (the test suite's tolerance)
# Means of these carry sigma_k^2 terms, whose relative spread grows like (1 + 2/(n-1))^t: once that
# exceeds a tenth of the chains, the chain mean is set by a few rare chains and its interval is not reliable.
HEAVY = ("var_ratio", "w2_sq")


def gaussian_quantities(run: Run) -> dict[str, np.ndarray]:
    """Per-chain quantities (T, C) of one 1-D Gaussian run against the truth N(mu0, s0^2)."""
    p = common.stack(common.models(run.path), ("mean", "cov"))
    mu0, s0 = float(run.config["data"]["options"]["mean"]), float(run.config["data"]["options"]["std"])
    mu, var = p["mean"][..., 0], p["cov"][..., 0, 0]
    sigma = np.sqrt(var)
    return {
        "log_var_shift": np.log(var / s0**2),
        "sigma_ratio": sigma / s0,
        "var_ratio": var / s0**2,
        "w2_sq": ((mu - mu0) ** 2 + (sigma - s0) ** 2) / s0**2,  # W2^2 between 1-D Gaussians
        "mean_sq_per_var": (mu - mu0) ** 2 / s0**2,
    }


PANELS = [
    ("log_var_shift", "E[log σ_t² / σ_0²]", "linear"),
    ("sigma_ratio", "E[σ_t] / σ_0", "log"),
    ("var_ratio", "E[σ_t²] / σ_0²  (heavy-tailed)", "log"),
    ("w2_sq", "E[W2²(fit t, truth)] / σ_0²", "linear"),
]


def gaussian_part(runs: list[Run], out: Path) -> list[str]:
    """figures/shumailov.png and the Gaussian table rows."""
    loaded = sorted(
        ((int(r.config["data"]["n_train"]), int(r.config["model"]["options"]["ddof"]), gaussian_quantities(r))
         for r in runs),
        key=lambda r: (r[1], r[0]),
    )  # fmt: skip
    fig, axes = common.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 7.2), squeeze=False)
    colors = dict(zip(sorted({n for n, _, _ in loaded}), ["C0", "C1", "C2", "C3"], strict=False))
    lines = common.table(
        ["ddof", "n", "t", "quantity", "measured (mean ± 95% Student-t half width over 1000 chains)",
         "closed form", "z = (measured − closed form) / SE"]
    )  # fmt: skip
    for n, ddof, q in loaded:
        t = np.arange(1, q["w2_sq"].shape[0] + 1)
        th = gaussian_expected("replace", n, t, ddof=ddof)
        for ax, (key, title, scale) in zip(axes[ddof], PANELS, strict=True):
            common.band(ax, t, q[key], color=colors[n], lw=1.2, label=f"n = {n} measured")
            ax.plot(
                t, th[key], color="k", ls="--", lw=0.9, label="closed form" if n == loaded[0][0] else None
            )
            ax.set_yscale(scale)
            ax.set_title(f"{title}, ddof {ddof}", fontsize=9)
            ax.set_xlabel("fit t")
        lines += check_rows(ddof, n, q, th, len(t))
        collapsed = float((q["sigma_ratio"][-1] < 0.1).mean())
        lines.append(f"| {ddof} | {n} | {len(t)} | P(σ_t < 0.1 σ_0) | {collapsed:.3f} | | |")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(
        "Repeated Gaussian fitting (replace), 1000 chains: measured mean with its 95% Student-t band "
        "vs closed form (dashed)"
    )
    common.save_figure(fig, out / "shumailov.png")
    return lines


def check_rows(ddof: int, n: int, q: dict[str, np.ndarray], th: dict[str, np.ndarray], fits: int) -> list:
    """Table rows at the fits in CHECK_T: the measured mean, closed form and z, flagged beyond Z or heavy."""
    lines = []
    for key in ("log_var_shift", "sigma_ratio", "var_ratio", "w2_sq"):
        m, se, half, _ = student_t_band(q[key], axis=1)
        for tc in (tc for tc in CHECK_T if tc <= fits):
            z = (m[tc - 1] - th[key][tc - 1]) / se[tc - 1]
            flag = " **" if abs(z) > Z else ""
            tail = (1 + 2 / (n - 1)) ** tc  # E[σ_t⁴] / E[σ_t²]², the spread of the σ² terms
            if key in HEAVY and tail > q[key].shape[1] / 10:
                flag = f" (heavy tail: E[σ⁴]/E[σ²]² = {tail:.1g})"
            measured = f"{m[tc - 1]:.4g} ± {half[tc - 1]:.2g}"
            lines.append(
                common.row([ddof, n, tc, key, measured, f"{th[key][tc - 1]:.4g}", f"{z:+.1f}{flag}"])
            )
    return lines


def gmm_part(run: Run, out: Path) -> list[str]:
    """figures/shumailov_gmm.png and the GMM table rows: component covariances collapse, components die."""
    p = common.stack(common.models(run.path), ("weights", "means", "covs"))
    w, covs = p["weights"], p["covs"]  # (T, C, K), (T, C, K, d, d)
    n, std = int(run.config["data"]["n_train"]), float(run.config["data"]["options"]["std"])
    d = covs.shape[-1]
    logdet = np.linalg.slogdet(covs)[1] - d * math.log(std**2)  # log det Sigma_k / det Sigma_true
    alive = w > 1.0 / n  # a component with weight < 1/n draws on average < 1 sample: lost
    t = np.arange(1, w.shape[0] + 1)
    live_logdet = np.where(alive, logdet, np.nan)
    chain = np.nanmean(live_logdet, axis=2)  # (T, C): the per-chain mean over its live components
    approx = gaussian_expected("replace", n // 2, t, d=d, ddof=0)["log_det_shift"]
    lost = (~alive).any(2).mean(1)

    fig = common.pyplot().figure(figsize=(15, 7.2))
    grid = fig.add_gridspec(2, 12)  # three panels above, four sample scatters below
    ax1 = fig.add_subplot(grid[0, 0:4])
    label = "measured (mean over chains of live components, 95% Student-t band)"
    m, _, half, _ = common.band(ax1, t, chain, alpha=0.3, label=label)
    ax1.plot(t, approx, "k--", lw=0.9, label=f"Gaussian ML closed form, n_k = n/2 = {n // 2}")
    ax1.set_title("E[log det Σ_k,t / det Σ_true]", fontsize=9)
    ax1.set_xlabel("fit t")
    ax1.legend(fontsize=7)
    ax2 = fig.add_subplot(grid[0, 4:8])
    ax2.plot(t, lost)
    ax2.set_title("fraction of chains that lost a component (weight < 1/n)", fontsize=9)
    ax2.set_xlabel("fit t")
    ax3 = fig.add_subplot(grid[0, 8:12])
    q = np.nanpercentile(live_logdet.reshape(len(t), -1), [10, 50, 90], axis=1)
    ax3.plot(t, q[1], label="median")
    ax3.fill_between(t, q[0], q[2], alpha=0.3, lw=0, label="10-90%")
    ax3.set_title("log det Σ_k,t / det Σ_true over live components", fontsize=9)
    ax3.set_xlabel("fit t")
    ax3.legend(fontsize=7)
    draw_samples(fig, grid, p, n, d)
    fig.suptitle(f"Two-component GMM refitted by EM on n = {n} of its own samples, {w.shape[1]} chains")
    common.save_figure(fig, out / "shumailov_gmm.png")

    checks = sorted({tc for tc in (1, 10, 100, len(t) // 2, len(t)) if tc <= len(t)})
    return common.table(
        ["t", "E log det Σ_k/Σ_true (live, mean ± 95% Student-t half width over chains)",
         "Gaussian approx. (n_k = n/2)", "chains with a lost component"],
        ([tc, f"{m[tc - 1]:.3g} ± {half[tc - 1]:.2g}", f"{approx[tc - 1]:.3g}", f"{lost[tc - 1]:.2f}"]
         for tc in checks),
    )  # fmt: skip


def draw_samples(fig, grid, p: dict[str, np.ndarray], n: int, d: int) -> None:
    """Samples of chain 0 at a few generations, drawn from the saved parameters (the bottom row)."""
    w = p["weights"]
    shows = [0, w.shape[0] // 10, w.shape[0] // 2, w.shape[0] - 1]
    model = GMMFamily(chains=1, event_shape=(d,), components=w.shape[2], dtype="float64")
    for i, g in enumerate(shows):
        ax = fig.add_subplot(grid[1, 3 * i : 3 * i + 3])
        model.load_state_dict({k: torch.from_numpy(p[k][g, :1]) for k in ("weights", "means", "covs")})
        x = model.sample(n, generator=torch.Generator().manual_seed(g))[0].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(f"chain 0, fit {g + 1}: weights {np.round(w[g, 0], 2)}", fontsize=8)
        ax.set_xlim(-4, 4)
        ax.set_ylim(-2.5, 2.5)


def main(argv: Sequence[str] | None = None) -> None:
    """Draw both figures and write figures/shumailov.md."""
    args = common.arguments(__doc__, argv)
    gaussian = common.runs_under(args.runs, "shumailov")
    gmm = common.runs_under(args.runs, "shumailov_gmm/base")[0]
    args.out.mkdir(parents=True, exist_ok=True)
    text = [
        "# Shumailov et al.: repeated fitting (`experiments/shumailov/run.sh`)",
        "",
        "## Gaussian, replace, 1000 chains (fit t = loop generation + 1)",
        "",
        *gaussian_part(gaussian, args.out),
        "",
        "±: 95% Student-t half width over chains; z: (measured − closed form) / SE over chains, a test "
        "statistic. `**`: |z| > 5. Heavy tail: E[σ_t²] and E[W2²] (through the mean's random walk, whose "
        "steps have variance σ_k²/n) are carried by rare chains once E[σ_t⁴]/E[σ_t²]² = (1 + 2/(n-1))^t "
        "exceeds chains/10 (docs/science.md); a 1000-chain mean then typically falls short and its interval "
        "is unreliable.",
        "",
        "## Two-component GMM (EM), replace",
        "",
        *gmm_part(gmm, args.out),
        "",
        "The Gaussian closed form with n_k = n/2 points per component holds while both components live; "
        "the weights drift (a Wright-Fisher walk) until one component is lost, after which the survivor "
        "is fitted on all n points and collapses at half the rate (the live average is selection-biased).",
    ]
    common.write_lines(args.out / "shumailov.md", text)
    print(f"wrote {args.out}/shumailov.png, shumailov_gmm.png, shumailov.md")


if __name__ == "__main__":
    common.entry(main)
