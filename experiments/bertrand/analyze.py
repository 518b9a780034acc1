"""Bertrand et al. (ICLR 2024) reproduced in 2-D: measured contraction vs the sufficient condition.

Runs: runs/bertrand/* (a RealNVP flow on two moons, started from a flow trained on rings, retrained
with all real data plus lambda x n of its own samples; fully synthetic = replace), seeds 0-2.
Errors e_t: KL(truth || model) and the Frechet distance to held-out points (results.jsonl);
generation 0 is the rings start. With finite samples and 150 training steps per generation the
error stops at a floor (docs/science.md: a statistical error term), which lambda = 0 reaches in one
generation; a log-linear fit over all generations then mixes the contraction with the floor.
So the contraction is measured on the excess e_t - floor (floor: the lambda = 0 run of the same
seed, mean over its second half), over the generations before the error first comes within a
factor 2 of the floor, by stability.contraction_rate; the regime's rate is the mean over seeds
(Student-t 95% interval over seeds). It is drawn beside stability.bertrand_condition(lambda)
(L eps = 0: the condition lambda < 1/2 and its rate lambda / (1 - lambda)) and the exact
Gaussian-MLE rate lambda / (1 + lambda).

Usage: python experiments/bertrand/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simulator.stability import bertrand_condition, contraction_rate, regime_verdict, t_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

ERRORS = (("kl_truth", "KL(truth ‖ model)"), ("frechet", "Fréchet distance (W2² of Gaussian fits)"))
REPLACE_X = 2.6  # where fully synthetic sits on the lambda axis of the rate panel
Regime = tuple[float, str]


def regime(config: dict) -> Regime:
    """(sort key / lambda, label): lambda for mix, +inf for replace."""
    p = config["policy"]
    if p["name"] == "replace":
        return math.inf, "fully synthetic"
    return float(p["lam"]), f"λ = {float(p['lam']):g}"


def excess_rate(curve: np.ndarray, floor: float) -> float:
    """Contraction rate of curve - floor over the generations before curve first falls below 2 floor."""
    excess = curve - floor
    below = np.flatnonzero(excess <= floor)
    cut = int(below[0]) if below.size else len(curve)
    return contraction_rate(excess[:cut], start=0)["rho"] if cut >= 2 else math.nan


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean of the finite values and the half width of its Student-t 95% interval (nan when undefined)."""
    ci = t_interval(values)
    return ci["mean"], ci["half"]


def floors(real_only: dict[int, Run]) -> dict[str, dict[int, float]]:
    """Per metric and seed: the lambda = 0 run's error, the mean over its second half."""
    return {
        metric: {seed: float(np.mean(common.column(run.rows, metric)[len(run.rows) // 2 :]))
                 for seed, run in real_only.items()}
        for metric, _ in ERRORS
    }  # fmt: skip


def rate_cell(r: float, e: float) -> str:
    """A measured rate with its half width, or why there is none."""
    if math.isnan(r):
        return "— (floor after 1 generation)"
    if math.isnan(e):  # one seed had generations above 2 x floor: no interval from one value
        return f"{r:.3f} (one seed; the others at the floor after 1 generation)"
    return f"{r:.3f} ± {e:.3f}"


def theory_cells(lam: float) -> list[str]:
    """Bertrand et al.'s condition and guaranteed rate, and the Gaussian MLE's rate, at lambda."""
    if math.isinf(lam):
        return ["no (fully synthetic)", "—", "— (collapses)"]
    cond = bertrand_condition(lam)
    rho = "—" if cond["rho"] is None else f"{cond['rho']:.3f}"
    return [f"{'holds' if cond['holds'] else 'fails'} ({cond['lhs']:.2f})", rho, f"{lam / (1 + lam):.3f}"]


def draw_rates(ax, rates: dict[str, dict[Regime, tuple[float, float]]]) -> None:
    """The rate panel: the measured rates over the guaranteed and the Gaussian MLE's."""
    lam_grid = np.linspace(0, 2.2, 200)
    bound = np.array(
        [bertrand_condition(x)["rho"] if bertrand_condition(x)["holds"] else np.nan for x in lam_grid]
    )
    ax.plot(lam_grid, bound, "k-", lw=1.2, label="Bertrand et al. guaranteed ρ (Lε = 0), where λ < 1/2")
    ax.axvspan(0, 0.5, color="0.9", label="sufficient condition holds")
    ax.plot(lam_grid, lam_grid / (1 + lam_grid), "k--", lw=0.9, label="Gaussian MLE: ρ = λ/(1+λ)")
    for j, (metric, _) in enumerate(ERRORS):
        xs, ys, es = [], [], []
        for (lam, _), (r, e) in rates[metric].items():
            xs.append(REPLACE_X if math.isinf(lam) else lam + (j - 0.5) * 0.04)
            ys.append(r)
            es.append(0 if math.isnan(e) else e)
        label = f"measured ρ of {metric} − floor (mean, Student-t 95% interval over seeds)"
        ax.errorbar(xs, ys, yerr=es, fmt="o" if j == 0 else "s", ms=5, capsize=3, label=label)
    ax.axhline(1.0, color="0.5", lw=0.6)
    ax.set_xticks([0, 0.25, 0.5, 1, 2, REPLACE_X], ["0", "0.25", "0.5", "1", "2", "fully\nsynthetic"])
    ax.set_xlabel("λ (synthetic : real)")
    ax.set_ylabel("contraction rate ρ per generation")
    ax.set_ylim(0, 1.4)
    ax.set_title("measured contraction vs the sufficient condition", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")


def regime_row(axes, key: Regime, color: str, runs: dict[int, Run], floor: dict, rates: dict) -> str:
    """One regime's error curves (mean over seeds over its Student-t band) and its table row; its measured
    rates are added to rates."""
    lam, name = key
    cells = []
    for ax, (metric, title) in zip(axes, ERRORS, strict=True):
        curves = np.array([common.column(run.rows, metric) for run in runs.values()])  # (seeds, T + 1)
        gens = np.arange(curves.shape[1])
        m = curves.mean(0)
        ax.plot(gens, m, color=color, marker=".", label=f"{name} ({len(runs)} seeds)")
        if len(runs) > 1:
            half = np.array([t_interval(c)["half"] for c in curves.T])  # Student-t, seeds - 1 dof
            ax.fill_between(gens, np.maximum(m - half, m * 0.05), m + half, color=color, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel("generation (0 = the rings model)")
        ax.set_title(title, fontsize=10)
        per_seed = [excess_rate(c, floor[metric].get(s, 0.0)) for s, c in zip(runs, curves, strict=True)]
        rates[metric][key] = mean_ci(per_seed)
        cells.append(rate_cell(*rates[metric][key]))
    kl = np.array([common.column(run.rows, "kl_truth") for run in runs.values()])
    raw = mean_ci([contraction_rate(c, start=0)["rho"] for c in kl])
    v = regime_verdict(kl)  # over seeds, each against its generation 0 (the rings start)
    change = f"{v['change']:.3g} [{v['change_low']:.3g}, {v['change_high']:.3g}]"
    ends = f"{kl[:, 0].mean():.3f} → {kl[:, -1].mean():.3f}"
    verdict = f"{v['verdict']} (change {change})"
    return common.row([name, *theory_cells(lam), *cells, f"{raw[0]:.3f} ± {raw[1]:.3f}", ends, verdict])


def main(argv: Sequence[str] | None = None) -> None:
    """Draw figures/bertrand.png and write figures/bertrand.md."""
    args = common.arguments(__doc__, argv)
    runs = common.group(common.runs_under(args.runs, "bertrand"), lambda r: regime(r.config))
    groups = {key: common.by_seed(rs) for key, rs in runs.items()}  # regime -> seed -> run
    args.out.mkdir(parents=True, exist_ok=True)
    floor = floors(next((g for (lam, _), g in groups.items() if lam == 0), {}))

    fig, axes = common.subplots(1, 3, figsize=(17, 4.8))
    measured = [f"measured ρ, {m} excess (mean ± 95% Student-t half width over seeds)" for m, _ in ERRORS]
    table = common.table(
        ["regime", "condition λ(1 + Lε/α) < 1/2 (Lε = 0)", "guaranteed ρ = λ/(1-λ)",
         "Gaussian MLE ρ = λ/(1+λ)", *measured, "raw ρ, KL, all generations", "KL gen 0 → last",
         "verdict over seeds (KL vs generation 0)"]
    )  # fmt: skip
    rates: dict[str, dict[Regime, tuple[float, float]]] = {m: {} for m, _ in ERRORS}
    for i, (key, by_seed) in enumerate(groups.items()):
        color = "k" if math.isinf(key[0]) else f"C{i}"
        table.append(regime_row(axes[:2], key, color, by_seed, floor, rates))
    for ax, (metric, _) in zip(axes[:2], ERRORS, strict=True):
        if floor[metric]:
            level = np.mean(list(floor[metric].values()))
            ax.axhline(level, color="0.4", ls=":", lw=0.9, label="floor (λ = 0)")
        ax.legend(fontsize=7)
    draw_rates(axes[2], rates)
    fig.suptitle("Mixed retraining of a RealNVP flow on two moons, started from a flow of rings")
    common.save_figure(fig, args.out / "bertrand.png")

    text = [
        "# Bertrand et al.: stability of mixed retraining (`experiments/bertrand/run.sh`)",
        "",
        "Measured ρ: stability.contraction_rate of the excess error e_t − floor (floor: the λ = 0 run of "
        "the same seed, mean over its second half), over the generations before e_t first falls below "
        "2 × floor; per seed, then the mean over seeds ± the half width of its Student-t 95% interval. "
        "λ = 0 reaches its floor within one or two "
        "generations (its rate rests on generations 0-1; '—': at the floor after one generation). "
        "Raw ρ: the same fit on e_t itself over all generations, floor included (as summary.json reports).",
        "",
        *table,
    ]
    common.write_lines(args.out / "bertrand.md", text)
    print(f"wrote {args.out}/bertrand.png, bertrand.md")


if __name__ == "__main__":
    common.entry(main)
