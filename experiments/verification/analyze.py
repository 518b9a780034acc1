"""Feng et al. (2024) reproduced: synthetic data kept or dropped by a verifier of known error rates.

Toy (computed here from simulator.verification, seeded; no run directory): Feng et al.'s setting, a
symmetric two-class Gaussian mixture N(+-mu, I_d) (d = 10, ||2 mu|| = 2), candidates labelled wrong at
rate p = 0.45, an oracle verifier keeping a correct label with probability phi = 0.5 and a wrong one with
probability psi, swept so that p_* = (1-p) phi / ((1-p) phi + p psi) crosses 1/2 (psi = 0.611), k = 8
candidates per kept row, n kept rows in {50, 200, 1000}. The downstream model is the linear classifier of
the class means (LDA with identity covariance) fitted to the kept rows; its exact test accuracy is
0.5 [Phi((w.mu1 - b)/|w|) + Phi((b - w.mu0)/|w|)]. Mean over 300 chains per seed, 95% Student-t interval
over 3 seeds; the Bayes accuracy Phi(1) = 0.8413 and 1 - Phi(1) bound it.
Digits (runs/verification_digits/*): each generation's class fidelity -- the accuracy, on 200 samples
drawn 20 per class from the generation's saved model, of a classifier trained on the real digits (the
tiny CNN of simulator.metrics.features) -- and FID, per arm and seed; each arm minus `none`, paired by
seed, with its 95% Student-t interval over the 3 seeds.

Usage: python experiments/verification/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulator import verification
from simulator.stats import student_t_band

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

P, PHI, K, D, SEP, CHAINS, SEEDS = 0.45, 0.5, 8, 10, 2.0, 300, (0, 1, 2)
PSIS = np.round(np.linspace(0.0, 1.0, 11), 3)
NS = (50, 200, 1000)


def phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def downstream_accuracy(n: int, psi: float, seed: int) -> np.ndarray:
    """Per chain: the exact test accuracy of the class-mean classifier fitted to n verified rows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n * K,), generator=g)
    x = torch.randn(CHAINS, n * K, D, generator=g)
    x[..., 0] += (y.float() - 0.5) * SEP
    v = verification.Verifier("oracle", P, {"keep_correct": PHI, "keep_wrong": float(psi)}, 2, seed=seed)
    kept, labels = v.keep(x, y, 1, range(n), K, n)
    one = (labels == 1).float().unsqueeze(-1)
    m1 = (kept * one).sum(1) / one.sum(1).clamp_min(1)
    m0 = (kept * (1 - one)).sum(1) / (1 - one).sum(1).clamp_min(1)
    w, b = m1 - m0, ((m1 - m0) * (m1 + m0) / 2).sum(-1)  # classify as 1 where w.x > b
    norm = w.norm(dim=-1)
    mu1 = w[:, 0] * SEP / 2  # w . (+SEP/2 e_1)
    acc = 0.5 * (phi((mu1 - b) / norm) + phi((b + mu1) / norm))
    return acc.double().numpy()


def toy_part(out: Path) -> list[str]:
    """figures/verification_toy.png and its table."""
    fig, axes = common.subplots(1, 1, figsize=(6.0, 4.2), squeeze=False)
    ax = axes[0, 0]
    pstars = np.array([verification.p_star(P, PHI, psi) for psi in PSIS])
    lines = common.table(
        [
            "ψ (keep wrong)",
            "p_*",
            "share correct kept (k = 8)",
            *[f"accuracy, n = {n} (mean ± 95% t, 3 seeds)" for n in NS],
        ]
    )
    cells: dict[float, list[str]] = {float(psi): [] for psi in PSIS}
    for n, color in zip(NS, ("C1", "C2", "C0"), strict=True):
        per_seed = np.array([[downstream_accuracy(n, psi, s).mean() for s in SEEDS] for psi in PSIS])
        b = student_t_band(per_seed)
        ax.errorbar(pstars, b.mean, yerr=b.half, color=color, marker="o", ms=3, label=f"n = {n} kept rows")
        for psi, m, h in zip(PSIS, b.mean, b.half, strict=True):
            cells[float(psi)].append(f"{m:.4f} ± {h:.4f}")
    bayes = float(phi(torch.tensor(SEP / 2)))
    ax.axhline(bayes, color="k", ls="--", lw=0.8, label=f"Bayes Φ(1) = {bayes:.4f}")
    ax.axhline(1 - bayes, color="k", ls=":", lw=0.8)
    ax.axvline(0.5, color="C3", lw=0.8, label="Feng et al.'s breakdown p_* = 1/2")
    ax.axvline(1 - P, color="C7", ls="--", lw=0.8, label=f"no verifier: p_* = 1 - p = {1 - P:g}")
    ax.set_xlabel("p_* = P(label correct | kept)")
    ax.set_ylabel("test accuracy of the classifier fitted to the kept rows")
    ax.set_title(
        f"Two-class Gaussian mixture (d = {D}), labels wrong at p = {P}, oracle verifier φ = {PHI}\n"
        "mean, 95% Student-t interval over 3 seeds (300 chains each)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    common.save_figure(fig, out / "verification_toy.png")
    for psi, pstar in zip(PSIS, pstars, strict=True):
        share = verification.kept_correct(P, PHI, float(psi), K)
        lines.append(common.row([f"{psi:g}", f"{pstar:.3f}", f"{share:.3f}", *cells[float(psi)]]))
    return lines


def arm(run: Run) -> str:
    sample = run.config["sample"]
    if not sample.get("label_noise"):
        return "clean"
    if sample.get("verifier") is None:
        return "none"
    return "good" if float(sample["verifier_options"]["keep_correct"]) > 0.5 else "bad"


def fidelity(run: Run, classifier: Any) -> list[float]:
    """Per generation: the classifier's accuracy on 20 samples per class of the generation's model."""
    from omegaconf import OmegaConf

    from simulator import registry, seeding

    cfg = OmegaConf.create(run.config)
    make = registry.make_model_factory(cfg, (1, 8, 8), "cpu")
    labels = torch.arange(10).repeat_interleave(20)
    out = []
    for t, state in enumerate(common.models(run.path)):
        model = make()
        model.load_state_dict(state)
        x = model.sample(len(labels), labels, generator=seeding.generator(int(cfg.seed), t, "fidelity"))[0]
        with torch.no_grad():
            pred = classifier.logits(x).argmax(-1)
        out.append(float((pred == labels).double().mean()))
    return out


def digits_part(runs: list[Run], out: Path) -> list[str]:
    """figures/verification_digits.png and its table."""
    from simulator.data.images import make_image
    from simulator.metrics import features

    real = make_image("digits").load(chains=1, n_train=None, n_test=None, generator=torch.Generator())
    net = features.get_extractor(
        "tiny",
        "verification-digits-all",
        real.train[0],
        real.train_labels[0],
        Path("~/.cache/simulator").expanduser(),
    )
    groups = common.group(runs, arm)
    fig, axes = common.subplots(1, 2, figsize=(10.0, 3.8), squeeze=False)
    colors = {"clean": "k", "none": "C3", "good": "C0", "bad": "C1"}
    share = {
        "clean": 1.0,
        "none": 1 - 0.3,
        "good": verification.kept_correct(0.3, 0.9, 0.1, 2),
        "bad": verification.kept_correct(0.3, 0.3, 0.9, 2),
    }
    fid: dict[str, np.ndarray] = {}
    fide: dict[str, np.ndarray] = {}
    for name in ("clean", "none", "good", "bad"):
        seeds = common.by_seed(groups.get(name, []))
        if not seeds:
            continue
        fide[name] = np.array([fidelity(r, net) for r in seeds.values()]).T  # (T, seeds)
        fid[name] = np.array([common.column(r.rows, "fid") for r in seeds.values()]).T
        t = np.arange(fide[name].shape[0])
        common.band(
            axes[0, 0], t, fide[name], color=colors[name], label=f"{name} (share correct {share[name]:.3f})"
        )
        common.band(axes[0, 1], t, fid[name], color=colors[name], label=name)
    lines = common.table(
        [
            "arm",
            "share of correct labels entering D_t",
            "class fidelity gen 0",
            "class fidelity gen T (mean ± 95% t, 3 seeds)",
            "arm − none, paired (mean ± 95% t)",
            "FID gen T",
            "FID arm − none, paired",
        ]
    )
    for name in fide:
        last = fide[name][-1]
        b, f = student_t_band(last), student_t_band(fid[name][-1])
        diff = fdiff = "—"
        if name != "none" and "none" in fide:
            d, e = student_t_band(last - fide["none"][-1]), student_t_band(fid[name][-1] - fid["none"][-1])
            diff, fdiff = f"{d.mean:+.3f} ± {d.half:.3f}", f"{e.mean:+.3f} ± {e.half:.3f}"
        lines.append(
            common.row(
                [
                    name,
                    f"{share[name]:.3f}",
                    f"{fide[name][0].mean():.3f}",
                    f"{b.mean:.3f} ± {b.half:.3f}",
                    diff,
                    f"{f.mean:.3f} ± {f.half:.3f}",
                    fdiff,
                ]
            )
        )
    axes[0, 0].set_title(
        "class fidelity of G_t (classifier accuracy on 20 samples/class)\n"
        "mean, 95% Student-t band over 3 seeds",
        fontsize=9,
    )
    axes[0, 1].set_title(
        "FID (tiny extractor, 300 samples)\nmean, 95% Student-t band over 3 seeds", fontsize=9
    )
    for ax in axes[0]:
        ax.set_xlabel("generation")
        ax.legend(fontsize=7)
    fig.suptitle(
        "Digits, fully synthetic retraining with labels wrong at rate 0.3:\n"
        "verification by an oracle of set error rates (k = 2 candidates)",
        fontsize=10,
    )
    common.save_figure(fig, out / "verification_digits.png")
    return lines


def main() -> None:
    args = common.arguments(__doc__)
    lines = [
        "# Verification of synthetic data (Feng et al. 2024)",
        "",
        "## Toy: the breakdown at p_* = 1/2",
        "",
    ]
    lines += toy_part(args.out)
    if (args.runs / "verification_digits").exists():
        lines += ["", "## Digits: label noise and an oracle verifier in the loop", ""]
        lines += digits_part(common.runs_under(args.runs, "verification_digits"), args.out)
    common.write_lines(args.out / "verification.md", lines)


if __name__ == "__main__":
    common.entry(main)
