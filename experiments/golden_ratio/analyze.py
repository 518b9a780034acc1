"""He, Xu and Cheng (2025), golden-ratio weighting: table and figure from the run directories alone.

Per run (one weight w = policy.weight_real) and chain, the stationary error is the mean of
||mu_t - mu||^2 over generations BURN+1..T (gen_XXX's model file holds every chain's fitted mean); its
Student-t 95% interval is over the chains, which are independent. Beside it: the exact closed form for
the gaussian family as it runs (covariance estimated too) and He et al.'s, which takes sigma as known
(simulator.stability.golden_ratio_stationary; derivation in README.md).

Usage: python experiments/golden_ratio/analyze.py [--runs runs] [--out experiments/golden_ratio]
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from simulator.stability import golden_ratio_stationary

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import AnalysisError, Run  # noqa: E402

BURN = 30  # generations left out before averaging (the start fades like (1 - w)^t; w >= 0.2 here)
PHI_INV = (math.sqrt(5) - 1) / 2


def stationary_error(run: Run, burn: int = BURN) -> dict[str, float]:
    """Chain-mean of the time-averaged ||mu_t - mu||^2 over generations burn+1.., with its t interval."""
    config = run.config
    states = common.models(run.path, start=burn + 1)
    if not states:
        raise AnalysisError(f"{run.path}: no generations after {burn}")
    d = int(config["data"]["options"]["dim"])
    truth = torch.as_tensor(config["data"]["options"]["mean"], dtype=torch.float64).expand(d)
    err = torch.stack([(s["mean"].double() - truth).square().sum(1) for s in states])  # (T - burn, C)
    per_chain = err.mean(0).numpy()
    c = len(per_chain)
    # student_t_band's half-width, in the order of operations that made the committed results.json
    half = stats.t.ppf(0.975, c - 1) * per_chain.std(ddof=1) / math.sqrt(c)
    policy = config["policy"]
    n, m = int(policy["n_real"]), int(policy["n_syn"])
    sigma2 = float(config["data"]["options"]["std"]) ** 2
    w = float(policy["weight_real"])
    exact = d * golden_ratio_stationary(w, n, m, sigma2)[0]
    known = d * golden_ratio_stationary(w, n, m, sigma2, known_sigma=True)[0]
    return {"w": w, "measured": float(per_chain.mean()), "half95": float(half), "chains": c,
            "generations": len(states), "exact": float(exact), "known_sigma": float(known), "n": n, "m": m,
            "d": d, "sigma2": sigma2}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Write results.json, results.md and stationary_error.png, and print the table."""
    args = common.arguments(
        __doc__, argv, out="experiments/golden_ratio", out_help="where the figure and table go"
    )
    root = args.runs / "golden_ratio"
    runs = [common.load(p) for p in sorted(root.glob("policy.weight_real=*"))]
    if not runs:
        raise AnalysisError(f"no runs under {root}: run experiments/golden_ratio/run.sh")
    rows = sorted((stationary_error(r) for r in runs), key=lambda r: r["w"])
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_text(args.out / "results.json", json.dumps(rows, indent=1))
    r0 = rows[0]
    lines = [
        f"d = {r0['d']}, n = {r0['n']} fresh real rows, m = {r0['m']} samples, sigma^2 = {r0['sigma2']:g}, "
        f"{r0['chains']} chains, generations {BURN + 1}..{BURN + r0['generations']} averaged.",
        "",
        *common.table(["w", "measured E‖mu_t − mu‖²", "t 95% (chains)", "exact (Sigma estimated)", "z",
                       "known sigma (He)"]),
    ]  # fmt: skip
    for r in rows:
        z = (r["measured"] - r["exact"]) / (r["half95"] / stats.t.ppf(0.975, r["chains"] - 1))
        lines.append(common.row([f"{r['w']:g}", f"{r['measured']:.5f}", f"± {r['half95']:.5f}",
                                 f"{r['exact']:.5f}", f"{z:+.2f}", f"{r['known_sigma']:.5f}"]))  # fmt: skip
    best = min(rows, key=lambda r: r["measured"])
    grid = np.linspace(0.05, 0.999, 4000)
    w_exact = grid[np.argmin(golden_ratio_stationary(grid, r0["n"], r0["m"], r0["sigma2"])[0])]
    lines += ["", f"measured argmin over the grid: w = {best['w']:g}; exact closed form's argmin: "
              f"w = {w_exact:.4f}; known-sigma argmin: 1/phi = {PHI_INV:.4f}."]  # fmt: skip
    common.write_lines(args.out / "results.md", lines)
    print("\n".join(lines))
    draw(rows, args.out / "stationary_error.png")


def draw(rows: list[dict], path: Path) -> None:
    """The measured stationary error per w over both closed forms."""
    r0 = rows[0]
    grid = np.linspace(0.12, 0.97, 400)
    d, n, m, s2 = r0["d"], r0["n"], r0["m"], r0["sigma2"]
    fig, ax = common.subplots(figsize=(6, 4))
    ax.plot(grid, d * golden_ratio_stationary(grid, n, m, s2)[0], "k-", lw=1.2,
            label="closed form, Sigma estimated (this family)")  # fmt: skip
    ax.plot(grid, d * golden_ratio_stationary(grid, n, m, s2, known_sigma=True)[0], "k--", lw=1,
            label="closed form, sigma known (He et al.)")  # fmt: skip
    ax.errorbar([r["w"] for r in rows], [r["measured"] for r in rows], yerr=[r["half95"] for r in rows],
                fmt="o", color="C3", ms=4, capsize=3, label=f"measured ({r0['chains']} chains)")  # fmt: skip
    ax.axvline(PHI_INV, color="C0", lw=0.8, ls=":", label="w = 1/phi")
    ax.set_xlabel("weight of the fresh real data w")
    ax.set_ylabel("stationary E||mu_t - mu||^2")
    ax.set_yscale("log")
    ax.set_title(f"Golden-ratio weighting: d={d}, n=m={n}", fontsize=10)
    ax.legend(fontsize=8)
    common.save_figure(fig, path, dpi=130)


if __name__ == "__main__":
    common.entry(main)
