"""Gillman et al. (ICML 2024) reproduced: self-correcting self-consuming loops, Gaussian toy and digits.

Gaussian (runs/self_correction_gaussian/*): N(0, I_2) refitted by maximum likelihood each generation,
rows of S_t corrected with probability gamma/(1 + gamma) to a fresh draw of the truth. Per chain, the
Wasserstein-2 distance of G_t to the truth (exact for Gaussians: ||mu||^2 + sum_i (sqrt(l_i) - 1)^2, l_i
the eigenvalues of Sigma_t), averaged over each seed's chains; the 95% Student-t interval is over the 3
seeds (simulator.stats.student_t_band). Under replace, E tr Sigma_t against simulator.correction.
gaussian_expected, as a z-score over all chains of the 3 seeds.
Digits (runs/self_correction_digits/*): FID (tiny extractor, 500 samples) per generation of each
(lambda, correction, seed); kmeans minus none is paired by seed (the same generation 0 and streams), its
mean and 95% Student-t interval over the 3 seeds.

Usage: python experiments/self_correction/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from simulator.correction import gaussian_expected
from simulator.stats import student_t_band

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402


def w2_and_trace(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Per generation and chain: W2(G_t, N(0, I)) and tr Sigma_t, each (T, C)."""
    w2, tr = [], []
    for state in common.models(run.path):
        mean, cov = state["mean"].double(), state["cov"].double()
        eig = torch.linalg.eigvalsh(cov).clamp_min(0)
        w2.append((mean.pow(2).sum(-1) + (eig.sqrt() - 1).pow(2).sum(-1)).sqrt().numpy())
        tr.append(cov.diagonal(dim1=-2, dim2=-1).sum(-1).numpy())
    return np.array(w2), np.array(tr)


def gamma_of(run: Run) -> float:
    return float(run.config["sample"]["correction_strength"])


def gaussian_part(runs: list[Run], out: Path) -> list[str]:
    """figures/self_correction_gaussian.png and its table."""
    policies = sorted({r.config["policy"]["name"] for r in runs}, key=("replace", "mix").index)
    gammas = sorted({gamma_of(r) for r in runs})
    colors = common.pyplot().get_cmap("viridis")(np.linspace(0, 0.9, len(gammas)))
    fig, axes = common.subplots(1, len(policies) + 1, figsize=(5.0 * (len(policies) + 1), 4.0), squeeze=False)
    lines = common.table(
        [
            "policy",
            "γ",
            "w = γ/(1+γ)",
            "W2(G_T, truth): mean ± 95% t half width (3 seeds)",
            "E tr Σ_T: measured ± 95% half width (chains)",
            "closed form",
            "z",
        ]
    )
    for j, policy in enumerate(policies):
        ax = axes[0, j]
        for gamma, color in zip(gammas, colors, strict=True):
            seeds = common.by_seed(
                r for r in runs if r.config["policy"]["name"] == policy and gamma_of(r) == gamma
            )
            loaded = [w2_and_trace(r) for r in seeds.values()]
            w2 = np.stack([w.mean(-1) for w, _ in loaded], -1)  # (T, seeds)
            t = np.arange(w2.shape[0])
            b = common.band(ax, t, w2, color=color, label=f"γ = {gamma:g}")
            trace = np.concatenate([tr for _, tr in loaded], -1)  # (T, chains of every seed)
            tb = student_t_band(trace)
            cells = ["", "", ""]
            if policy == "replace":
                run = next(iter(seeds.values()))
                n, dim = int(run.config["data"]["n_train"]), int(run.config["data"]["options"]["dim"])
                th = gaussian_expected(n, n, gamma, len(t) - 1, tr_sigma0=float(dim))["trace"]
                axes[0, -1].plot(t, tb.mean, color=color, label=f"γ = {gamma:g}")
                axes[0, -1].plot(t, th, "k--", lw=0.7)
                cells = [
                    f"{tb.mean[-1]:.4f} ± {tb.half[-1]:.4f}",
                    f"{th[-1]:.4f}",
                    f"{(tb.mean[-1] - th[-1]) / tb.se[-1]:+.1f}",
                ]
            lines.append(
                common.row(
                    [
                        policy,
                        f"{gamma:g}",
                        f"{gamma / (1 + gamma):.3f}",
                        f"{b.mean[-1]:.4f} ± {b.half[-1]:.4f}",
                        *cells,
                    ]
                )
            )
        ax.set_title(
            f"{policy}: W2(G_t, N(0, I₂)), n = 50\nmean over chains, 95% Student-t band over 3 seeds",
            fontsize=9,
        )
        ax.set_xlabel("generation")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0, -1].set_title("replace: E tr Σ_t (dashed: closed form)", fontsize=9)
    axes[0, -1].set_xlabel("generation")
    axes[0, -1].set_yscale("log")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(
        "Self-correction with the truth (Gillman et al.'s idealised π_γ): each synthetic row replaced "
        "by a truth draw with probability γ/(1+γ)"
    )
    common.save_figure(fig, out / "self_correction_gaussian.png")
    return lines


def digits_part(runs: list[Run], out: Path) -> list[str]:
    """figures/self_correction_digits.png and its table (kmeans - none paired by seed)."""

    def key(r: Run) -> tuple[float, str]:
        return float(r.config["policy"]["lam"]), str(r.config["sample"]["correction"] or "none")

    groups = common.group(runs, key)
    lams = sorted({k[0] for k in groups})
    fig, axes = common.subplots(1, len(lams) + 1, figsize=(4.8 * (len(lams) + 1), 3.8), squeeze=False)
    lines = common.table(
        [
            "λ",
            "FID gen 0",
            "FID gen T, no correction (mean ± 95% t, 3 seeds)",
            "FID gen T, k-means correction",
            "kmeans − none, paired by seed (mean ± 95% t)",
        ]
    )
    for j, lam in enumerate(lams):
        fid = {}
        for arm, color in (("none", "C3"), ("kmeans", "C0")):
            seeds = common.by_seed(groups.get((lam, arm), []))
            if not seeds:
                continue
            values = np.array([common.column(r.rows, "fid") for r in seeds.values()]).T  # (T, seeds)
            fid[arm] = values
            common.band(axes[0, j], np.arange(values.shape[0]), values, color=color, label=arm, marker="o")
        if len(fid) == 2:
            t = min(fid["none"].shape[0], fid["kmeans"].shape[0]) - 1
            diff = student_t_band(fid["kmeans"][t] - fid["none"][t])
            paired = fid["kmeans"][: t + 1] - fid["none"][: t + 1]  # (T, seeds): the same seed's two arms
            common.band(axes[0, -1], np.arange(t + 1), paired, label=f"λ = {lam:g}", marker="o")
            none, km = student_t_band(fid["none"][t]), student_t_band(fid["kmeans"][t])
            lines.append(
                common.row(
                    [
                        f"{lam:g}",
                        f"{fid['none'][0].mean():.3f}",
                        f"{none.mean:.3f} ± {none.half:.3f}",
                        f"{km.mean:.3f} ± {km.half:.3f}",
                        f"{diff.mean:+.3f} ± {diff.half:.3f}",
                    ]
                )
            )
        axes[0, j].set_title(
            f"λ = {lam:g}: FID per generation\nmean, 95% Student-t band over 3 seeds", fontsize=9
        )
        axes[0, j].set_xlabel("generation")
        axes[0, j].legend(fontsize=7)
    axes[0, -1].axhline(0, color="k", lw=0.6)
    axes[0, -1].set_title(
        "FID, k-means − none, paired by seed\nmean, 95% Student-t band over 3 seeds", fontsize=9
    )
    axes[0, -1].set_xlabel("generation")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(
        "Digits, class-conditional diffusion fine-tuned on real + λ n of its samples,\n"
        "with and without the k-means correction (16 centroids per class)",
        fontsize=10,
    )
    common.save_figure(fig, out / "self_correction_digits.png")
    return lines


def main() -> None:
    args = common.arguments(__doc__)
    lines = [
        "# Self-correcting self-consuming loops (Gillman et al., ICML 2024)",
        "",
        "## Gaussian toy: the idealised correction",
        "",
    ]
    lines += gaussian_part(common.runs_under(args.runs, "self_correction_gaussian"), args.out)
    digits = args.runs / "self_correction_digits"
    if digits.exists():
        lines += ["", "## Digits: k-means correction (their MNIST setting, scaled)", ""]
        lines += digits_part(common.runs_under(args.runs, "self_correction_digits"), args.out)
    common.write_lines(args.out / "self_correction.md", lines)


if __name__ == "__main__":
    common.entry(main)
