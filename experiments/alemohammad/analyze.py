"""Alemohammad et al. (ICLR 2024, "Self-consuming generative models go MAD") reproduced from run dirs.

1. Sampling bias (runs/alemohammad_bias): E tr Sigma_t / tr Sigma_0 and the mean drift from
   gen_XXX's model file against stability.gaussian_expected(..., tempered_real=False); precision and
   recall from results.jsonl.
2. 25-mode GMM (runs/alemohammad_gmm, runs/alemohammad_fresh): modes kept, counted from
   gen_XXX samples -- a mode is kept when at least 10% of its fair share of the samples
   (0.1 m / 25 of m) lie within 3 standard deviations of its mean -- and KL(truth || model).
3. Fresh-data loop from two initial models: the level each settles at (per chain, the mean KL
   over the last third of the generations) and their difference.
Every ± and band is the 95% Student-t interval over chains (simulator.stats.student_t_band); z-scores
against closed forms are (measured - closed form) / SE, a test statistic, not an interval.

Usage: python experiments/alemohammad/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from simulator import samples
from simulator.data.toy import make_toy
from simulator.stability import gaussian_expected
from simulator.stats import student_t_band

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

KEEP_SHARE = 0.1  # a mode is kept with at least this fraction of its fair share of samples within 3 std


# -- 1. sampling bias ---------------------------------------------------------------------------


def bias_part(runs: list[Run], axes: list, lines: list[str]) -> None:
    """Variance and mean drift under temperature s < 1 vs closed form; precision/recall vs generation."""
    runs = sorted(runs, key=lambda r: -float(r.config["sample"]["temperature"]))
    lines += common.table(
        ["s", "t", "E tr Σ_t / tr Σ_0 (mean ± 95% Student-t half width over chains)", "closed form s^(t-1)",
         "z = (measured − closed form) / SE", "E‖μ_t-μ_0‖²/tr Σ_0 (mean ± 95% half width)", "closed form",
         "z", "precision", "recall"]
    )  # fmt: skip
    for i, run in enumerate(runs):
        config, rows = run.config, run.rows
        p = common.stack(common.models(run.path), ("mean", "cov"))
        mean, cov = p["mean"], p["cov"]  # (T, C, d), (T, C, d, d)
        s = float(config["sample"]["temperature"])
        n, d = int(config["data"]["n_train"]), mean.shape[-1]
        tr0 = float(config["data"]["options"]["std"]) ** 2 * d  # Sigma_0 = std^2 I
        mu0 = float(config["data"]["options"]["mean"])
        t = np.arange(1, mean.shape[0] + 1)
        ddof = int(config["model"]["options"]["ddof"])
        th = gaussian_expected("replace", n, t, d=d, ddof=ddof, temperature=s, tempered_real=False)
        var = np.trace(cov, axis1=-2, axis2=-1) / tr0
        drift = ((mean - mu0) ** 2).sum(-1) / tr0
        color = f"C{i}"
        for ax, q, key in ((axes[0], var, "var_ratio"), (axes[1], drift, "mean_sq_per_var")):
            common.band(ax, t, q, color=color, label=f"s = {s:g}")
            ax.plot(t, th[key], "k--", lw=0.8)
        gens = [r["generation"] + 1 for r in rows]
        precision, recall = common.column(rows, "precision"), common.column(rows, "recall")
        axes[2].plot(gens, precision, color=color, label=f"precision, s = {s:g}")
        axes[2].plot(gens, recall, color=color, ls=":", label=f"recall, s = {s:g}")
        for tc in sorted({min(10, len(t)), len(t)}):
            bv, bd = student_t_band(var[tc - 1]), student_t_band(drift[tc - 1])
            tv, td = th["var_ratio"][tc - 1], th["mean_sq_per_var"][tc - 1]
            zv, zd = (bv.mean - tv) / bv.se, (bd.mean - td) / bd.se
            lines.append(
                common.row([f"{s:g}", tc, f"{bv.mean:.4g} ± {bv.half:.2g}", f"{tv:.4g}", f"{zv:+.1f}",
                            f"{bd.mean:.4g} ± {bd.half:.2g}", f"{td:.4g}", f"{zd:+.1f}",
                            f"{precision[tc - 1]:.3f}", f"{recall[tc - 1]:.3f}"])
            )  # fmt: skip
    axes[0].set_yscale("log")
    axes[0].set_title(
        "E tr Σ_t / tr Σ_0, 95% Student-t band (dashed: s^(t-1), real data untempered)", fontsize=9
    )
    axes[1].set_title("E‖μ_t − μ_0‖² / tr Σ_0, 95% Student-t band (dashed: closed form)", fontsize=9)
    axes[2].set_title("k-NN precision (solid) and recall (dotted), k = 3", fontsize=9)
    for ax in axes:
        ax.set_xlabel("fit t")
        ax.legend(fontsize=7)


# -- 2. modes -----------------------------------------------------------------------------------


def mode_stats(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per generation and chain: modes kept (T, C), fraction of samples within 3 std of a mode (T, C); and
    generations (T,)."""
    truth = make_toy("gmm", **run.config["data"]["options"]).params()
    means, stds = truth["means"].double(), truth["stds"].double()
    k = means.shape[0]
    kept, quality, gens = [], [], []
    for g in common.committed(run.path):
        x = samples.load(g).double()  # (C, m, d)
        dist = torch.cdist(x, means.expand(x.shape[0], k, -1))  # (C, m, K)
        near = dist.min(-1)
        inside = near.values < 3 * stds[near.indices]
        counts = torch.nn.functional.one_hot(near.indices, k).mul(inside.unsqueeze(-1)).sum(1)  # (C, K)
        kept.append((counts >= KEEP_SHARE * x.shape[1] / k).sum(1).numpy())
        quality.append(inside.double().mean(1).numpy())
        gens.append(int(g.name[4:]))
    return np.array(kept), np.array(quality), np.array(gens)


def label(run: Run) -> str:
    """The loop's name in the legend and the table."""
    p = run.config["policy"]
    name = {"replace": "fully synthetic (replace)", "accumulate": "synthetic augm. (accumulate)"}.get(
        p["name"]
    )
    if p["name"] == "mix":
        name = f"synthetic augm. (mix λ={p['lam']:g})"
    if p["name"] == "fresh":
        start = "bad start" if "bad" in str(run.config["init"]["checkpoint"]) else "fitted start"
        name = f"fresh data ({p['n_real']} real + {p['n_syn']} syn.), {start}"
    return name


def gmm_part(runs: list[Run], axes: list, lines: list[str]) -> list[tuple[str, np.ndarray]]:
    """Modes kept and KL per loop; returns (label, KL (T, C)) of every run for the fresh-data panel."""
    lines += common.table(
        ["loop", "modes kept: gen 0", "gen 20", "last gen (± 95% Student-t half width over chains)",
         "KL(truth‖model): gen 0", "last gen", "samples within 3σ of a mode (last)", "precision (last)",
         "recall (last)"]
    )  # fmt: skip
    out = []
    for i, run in enumerate(runs):
        kept, quality, gens = mode_stats(run)
        kl = common.chain_metric(run.path, "kl_truth")
        name = label(run)
        m, _, half, _ = common.band(axes[0], gens, kept, color=f"C{i}", label=name, alpha=0.2)
        axes[1].plot(gens, np.median(kl, 1), color=f"C{i}", label=name)
        g20 = min(20, len(gens) - 1)
        last = run.rows[-1]
        lines.append(
            common.row([name, f"{m[0]:.1f}", f"{m[g20]:.1f}", f"{m[-1]:.1f} ± {half[-1]:.1f}",
                        f"{kl[0].mean():.3g}", f"{kl[-1].mean():.3g}", f"{quality[-1].mean():.3f}",
                        f"{last['precision']:.3f}", f"{last['recall']:.3f}"])
        )  # fmt: skip
        out.append((name, kl))
    axes[0].set_title(
        f"modes kept (≥{KEEP_SHARE:.0%} of fair share within 3σ)\nmean, 95% Student-t band over chains",
        fontsize=9,
    )
    axes[0].set_ylim(0, 26)
    axes[1].set_yscale("log")
    axes[1].set_title("KL(truth ‖ model), median over chains", fontsize=9)
    for ax in axes:
        ax.set_xlabel("generation")
        ax.legend(fontsize=6)
    return out


def fresh_part(fresh: list[tuple[str, np.ndarray]], ax, lines: list[str]) -> None:
    """The fresh-data loop from two starts: the level each settles at, and their difference."""
    levels = {}
    for i, (name, kl) in enumerate(fresh):
        common.band(ax, np.arange(kl.shape[0]), kl, color=f"C{i + 3}", label=name, alpha=0.2)
        levels[name] = kl[-(kl.shape[0] // 3) :].mean(0)  # per chain: mean over the last third
        ax.axhline(levels[name].mean(), color=f"C{i + 3}", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_title(
        "fresh-data loop: KL(truth ‖ model) from two starts\nmean, 95% Student-t band over chains", fontsize=9
    )
    ax.legend(fontsize=6)
    lines += common.table(
        ["fresh-data loop start", "KL at gen 0", "settled level (per chain the mean over the last third of "
         "gens; mean ± 95% Student-t half width over chains)"]
    )  # fmt: skip
    for name, kl in fresh:
        b = student_t_band(levels[name])
        lines.append(common.row([name, f"{kl[0].mean():.3g}", f"{b.mean:.4f} ± {b.half:.4f}"]))
    if len(levels) == 2:
        a, b = (student_t_band(v) for v in levels.values())
        # Welch: the two starts are independent sets of chains with their own spreads
        diff, se = a.mean - b.mean, math.hypot(a.se, b.se)
        dof = se**4 / (a.se**4 / (a.n - 1) + b.se**4 / (b.n - 1))
        half = float(stats.t.ppf(0.975, dof)) * se
        lines.append(
            f"\nDifference of the settled levels: {diff:+.4f} ± {half:.4f} (95% Welch-Student-t half width, "
            f"{dof:.0f} dof; t = difference / SE = {diff / se:+.1f})."
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Draw figures/alemohammad.png and write figures/alemohammad.md."""
    args = common.arguments(__doc__, argv)
    bias = common.runs_under(args.runs, "alemohammad_bias")
    loops = common.runs_under(args.runs, "alemohammad_gmm", "alemohammad_fresh")
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = common.subplots(2, 3, figsize=(16, 9.5))
    text = [
        "# Alemohammad et al.: self-consuming loops go MAD (`experiments/alemohammad/run.sh`)",
        "",
        "## Gaussian with sampling bias s (replace, ddof 1, fit t = loop generation + 1)",
        "",
    ]
    bias_part(bias, list(axes[0]), text)
    text += ["", "## 25-mode GMM fitted by a 25-component GMM (EM)", ""]
    curves = gmm_part(loops, [axes[1, 0], axes[1, 1]], text)
    text += [""]
    fresh_part([c for c in curves if c[0].startswith("fresh")], axes[1, 2], text)
    fig.suptitle(
        "MAD: sampling bias on a Gaussian (top); 25-mode GMM under fully synthetic, augmentation "
        "and fresh-data loops (bottom)"
    )
    common.save_figure(fig, args.out / "alemohammad.png")
    common.write_lines(args.out / "alemohammad.md", text)
    print(f"wrote {args.out}/alemohammad.png, alemohammad.md")


if __name__ == "__main__":
    common.entry(main)
