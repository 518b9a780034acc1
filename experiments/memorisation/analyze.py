"""What collapse does to the samples: memorisation, entropy and tail mass per generation (issue 20).

Reads the runs of experiments/memorisation/run.sh (memorisation_2d: a narrow KDE of the eight
Gaussians, 20 chains per run; memorisation_digits: a small diffusion model on 8x8 digits, one chain,
fine-tuned every generation; memorisation_scratch: the same model trained from scratch every generation),
replace or accumulate, with no selection or Shi et al.'s greedy selection (2-D: also their threshold filter),
over 3 seeds. Every value is the run's chain mean (results.jsonl); the band and the +- are the 95%
Student-t interval over the 3 seeds (simulator.stats.student_t_band, 2 degrees of freedom: wide).
Draws <out>/memorisation_2d.png, memorisation_digits.png and memorisation_scratch.png (memorised
fraction, normalised nearest-neighbour distance, entropy of S_t and tail ratio against the generation)
and writes
<out>/memorisation.md (the first and last generation of each regime).

Usage: python experiments/memorisation/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simulator.stats import student_t_band, student_t_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

COLUMNS = (
    ("memorised", "memorised vs the real set (d1/d2 < 1/3)"),
    ("memorised_train", "memorised vs D_t"),
    ("nn_distance", "NN distance to the real set (/ real LOO NN)"),
    ("nn_distance_train", "NN distance to D_t (same scale)"),
    ("entropy", "entropy of S_t (Kozachenko-Leonenko, nats)"),
    ("entropy_train", "entropy of D_t (nats)"),
    ("tail_ratio", "tail mass / q (q = 0.05)"),
)
NAMES = ("memorisation_2d", "memorisation_digits", "memorisation_scratch")
STYLE = {
    ("replace", None): ("C3", "-"),
    ("replace", "greedy"): ("C3", "--"),
    ("accumulate", None): ("C0", "-"),
    ("accumulate", "greedy"): ("C0", "--"),
    ("replace", "threshold"): ("C3", ":"),
    ("accumulate", "threshold"): ("C0", ":"),
}


def regime(run: Run) -> tuple[str, str | None]:
    """(policy, selection) of a run."""
    return str(run.config["policy"]["name"]), run.config["sample"].get("selection")


def label(key: tuple[str, str | None]) -> str:
    return f"{key[0]}{f' + {key[1]} selection' if key[1] else ''}"


def values(runs: Sequence[Run], column: str) -> np.ndarray:
    """(generations, seeds): the column's chain mean per generation of each seed's run (common length)."""
    per_seed = [common.column(r.rows, column) for r in common.by_seed(runs).values()]
    t = min(len(v) for v in per_seed)
    return np.array([v[:t] for v in per_seed]).T


def part(name: str, runs: list[Run], out: Path) -> list[str]:
    """The figure of one experiment and its table's lines (first finite generation -> last)."""
    regimes = common.group(runs, lambda r: (regime(r)[0], regime(r)[1] or ""))
    fig, axes = common.subplots(2, 4, figsize=(16, 7))
    axes = axes.ravel()
    lines = common.table(["regime", "seeds", *(f"{c}: first -> last" for c, _ in COLUMNS)])
    for (policy, selection), group in regimes.items():
        key = (policy, selection or None)
        color, dash = STYLE.get(key, ("k", ":"))
        cells = []
        for ax, (column, title) in zip(axes, COLUMNS, strict=False):
            v = values(group, column)
            common.band(ax, np.arange(len(v)), v, color=color, label=label(key), linestyle=dash)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("generation")
            b = student_t_band(v)
            finite = [t for t in range(len(v)) if np.isfinite(v[t]).all()]
            if not finite:
                cells.append("-")
                continue
            t0, t1 = finite[0], finite[-1]
            start = f"{b.mean[t0]:.3g} ± {b.half[t0]:.2g}" + (f" (t={t0})" if t0 else "")
            cells.append(f"{start} -> {b.mean[t1]:.3g} ± {b.half[t1]:.2g}")
        lines.append(common.row([label(key), len(group), *cells]))
    axes[0].legend(fontsize=8)
    axes[-1].axis("off")
    title = f"{name}: mean over 3 seeds, 95% Student-t band (experiments/memorisation/run.sh)"
    fig.suptitle(title, fontsize=10)
    common.save_figure(fig, out / f"{name}.png")
    return lines


PAIRED = ("memorised", "memorised_train", "nn_distance_train", "entropy_train")


def paired(runs: list[Run]) -> list[str]:
    """Each regime minus replace at the last generation, paired by seed (the seeds share generation 0):
    the difference's mean and 95% Student-t half-width over the seeds both regimes have."""
    regimes = common.group(runs, lambda r: (regime(r)[0], regime(r)[1] or ""))
    base = common.by_seed(regimes.pop(("replace", ""), []))
    lines = common.table(["regime - replace (last generation)", "seeds", *PAIRED])
    for (policy, selection), group in regimes.items():
        mine = common.by_seed(group)
        seeds = sorted(set(mine) & set(base))
        cells = []
        for column in PAIRED:
            last = [
                (common.column(mine[s].rows, column)[-1], common.column(base[s].rows, column)[-1])
                for s in seeds
            ]
            mean, half, n = student_t_interval([a - b for a, b in last])
            cells.append(f"{mean:+.3g} ± {half:.2g}" if n else "-")
        lines.append(common.row([label((policy, selection or None)), len(seeds), *cells]))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Draw memorisation_2d.png, memorisation_digits.png, memorisation_scratch.png; write memorisation.md."""
    args = common.arguments(__doc__, argv, out="figures")
    args.out.mkdir(parents=True, exist_ok=True)
    text = ["# What collapse does to the samples (`experiments/memorisation/run.sh`)", ""]
    for name in NAMES:
        runs = common.runs_under(args.runs, name)
        text += [f"## {name}", "", *part(name, runs, args.out), "", *paired(runs), ""]
    common.write_lines(args.out / "memorisation.md", text)
    print(f"wrote {', '.join(f'{args.out}/{n}.png' for n in NAMES)} and {args.out}/memorisation.md")


if __name__ == "__main__":
    common.entry(main)
