"""Print the numbers behind the contamination findings, from run directories alone; copy the figures.

    python experiments/contamination/analyze.py substitute RUN      # accuracy vs alpha, generated vs control
    python experiments/contamination/analyze.py robustness RUN      # effective robustness per mode and ratio
    python experiments/contamination/analyze.py bias RUN [RUN ...]  # bias per generation (a run per loop)
    python experiments/contamination/analyze.py figures NAME RUN... # -> figures/contamination_NAME_*.png
                                                                    #    ([--out DIR]: elsewhere)

Means are over seeds with a 95% Student-t half-width; "paired" differences are taken seed by seed
(substitute and its control remove the same real images and train from the same initialisation). Every
table opens with the variances its intervals cover and leave out (the run's generator and classifier seeds,
split.draw and split.test) and the n behind each mean (a cell says (n=k) where only k seeds had a finite
value). Runs of earlier versions read the same (simulator.contamination.report.load_rows). The statistical
tests behind the README's wording: findings.py.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulator.contamination.report import (
    draw,
    interval_covers,
    interval_leaves_out,
    load_rows,
    real_only,
    run_label,
    with_robustness,
)
from simulator.contamination.robustness import shift_kind
from simulator.rundir import write_atomic
from simulator.stats import student_t_interval
from simulator.strict_json import number  # null (not finite) -> NaN

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: experiments.common
from experiments import common  # noqa: E402


def _rows(run: Path) -> tuple[dict, list[dict[str, Any]], dict]:
    config, rows = load_rows(run)
    rows, fits = with_robustness([r for r in rows if r.get("status") == "ok"])
    return config, rows, fits


def _cell(values: list[Any]) -> str:
    """mean ± 95% half-width, and (n=k) when only k of the values were finite (None / NaN are dropped)."""
    m, h, n = student_t_interval(values)
    if m != m:
        return "-"
    return f"{m:.4f} ± {h:.4f}" + (f" (n={n})" if n != len(values) else "")


def _intervals(config: dict[str, Any], n: int) -> str:
    """The line every table opens with: n per mean and the variances its intervals cover and leave out."""
    covers = "; ".join(interval_covers(config)) or "nothing"
    leaves = "; ".join(interval_leaves_out(config)) or "nothing"
    return (
        f"n = {n} seeds per mean (unless a cell says n=k). Intervals cover: {covers}. Leave out: {leaves}.\n"
    )


def _by(rows: list[dict], mode: str, ratio: float, gen_t: Any = "any") -> dict[int, dict]:
    return {
        r["seed"]: r
        for r in rows
        if r.get("kind") == "contaminated"
        and r["mode"] == mode
        and r["ratio"] == ratio
        and (gen_t == "any" or r.get("gen_t") == gen_t)
    }


def substitute(run: Path) -> None:
    """Clean accuracy vs alpha with generated and with the control's real substitutes; their paired gap."""
    config, rows, _ = _rows(run)
    shift = (config.get("control") or {}).get("shift")
    control = f"held-out real, {shift}" if shift else "held-out real"
    alphas = sorted({r["ratio"] for r in rows if r.get("mode") in ("substitute", "control")})
    print(f"## {run}\n\n{_intervals(config, len(config.get('seeds') or []))}")
    print("\n".join(common.table(["alpha", "substitute (generated)", f"control ({control})",
                                  "substitute - control, paired"])))  # fmt: skip
    zero = _by(rows, "substitute", 0.0)
    for a in alphas:
        gen = _by(rows, "substitute", a)
        ctl = _by(rows, "control", a) if a > 0 else zero
        diff = [number(gen[s].get("acc_clean")) - number(ctl[s].get("acc_clean")) for s in gen if s in ctl]
        print(common.row([f"{a:g}", _cell([r["acc_clean"] for r in gen.values()]),
                          _cell([r["acc_clean"] for r in ctl.values()]), _cell(diff)]))  # fmt: skip
    ref = [r for r in rows if r.get("kind") == "reference"][0]
    # one value per generator replicate (every row of a generator carries the same statistics)
    gen_acc = {r.get("gen_seed"): r["gen_ref_acc"] for r in rows if r.get("gen_ref_acc") is not None}
    if gen_acc:
        accs = [gen_acc[k] for k in sorted(gen_acc, key=str)]
        drops = [ref["acc_clean"] - a for a in accs]
        print(
            f"\nreal-trained reference classifier: {ref['acc_clean']:.4f} on the real test set, "
            f"{_cell(accs)} on the generated pools of {len(accs)} generator(s) "
            f"(each: {', '.join(f'{a:.4f}' for a in accs)}; drop {_cell(drops)})"
        )


ROBUSTNESS = ("acc_clean", "acc_shift_mean", "er_shift_mean")  # the robustness table's columns, in order


def robustness(run: Path) -> None:
    """Clean and mean shifted accuracy and effective robustness per mode and ratio, with the baseline fit."""
    config, rows, fits = _rows(run)
    fit = fits.get("acc_shift_mean")
    if not fit:
        print(f"{run}: no effective-robustness fit (fewer than 6 real-only baselines)")
        return
    print(f"## {run}\n\n{_intervals(config, len(config.get('seeds') or []))}")
    print(
        f"baseline fit over {fit['points']} real-only classifiers: "
        f"logit(shifted) = {fit['w']:.3f} logit(clean) + {fit['b']:.3f}\n"
    )
    base = [r["er_shift_mean"] for r in rows if r.get("kind") in ("reference", "baseline")]
    print(f"baselines: effective robustness {_cell(base)} (0 by construction of the fit, on average)\n")
    print("\n".join(common.table(["mode", "ratio", "clean", "mean shifted", "effective robustness",
                                  "ER - ER(real only), paired"])))  # fmt: skip
    zero = _by(rows, "substitute", 0.0)
    for mode in ("substitute", "augment", "control"):
        for ratio in sorted(
            {r["ratio"] for r in rows if r.get("mode") == mode and r.get("kind") == "contaminated"}
        ):
            sel = _by(rows, mode, ratio)
            gain = [
                number(sel[s].get("er_shift_mean")) - number(zero[s].get("er_shift_mean"))
                for s in sel
                if s in zero
            ]
            print(common.row([mode, f"{ratio:g}", *(_cell([r[m] for r in sel.values()]) for m in ROBUSTNESS),
                              _cell(gain)]))  # fmt: skip
    per_shift(rows, fits, zero)


def per_shift(rows: list[dict], fits: dict[str, Any], zero: dict[int, dict]) -> None:
    """Effective robustness per shift (Taori et al. define it for natural shifts: each is labelled), with
    each mode and ratio's paired change from the same seed's real-only classifier."""
    cols = [c for c in fits if c != "acc_shift_mean"]
    if not cols:
        return
    print("\nEffective robustness per shift (paired change from real only in brackets):\n")
    names = [f"{c[len('acc_') :]} ({shift_kind(c)})" for c in cols]
    print("\n".join(common.table(["mode", "ratio", *names])))
    for mode in ("substitute", "augment", "control"):
        for ratio in sorted(
            {r["ratio"] for r in rows if r.get("mode") == mode and r.get("kind") == "contaminated"}
        ):
            sel = _by(rows, mode, ratio)
            cells = []
            for c in cols:
                er = "er" + c[len("acc") :]
                gain = [number(sel[s].get(er)) - number(zero[s].get(er)) for s in sel if s in zero]
                cells.append(f"{_cell([r.get(er) for r in sel.values()])} [{_cell(gain)}]")
            print(common.row([mode, f"{ratio:g}", *cells]))


BIAS = (
    "acc_clean",
    "worst_group_acc",
    "align_gap",
    "dp_diff",
    "eo_diff",
    "biasamp",
    "biasamp_perfect",
    "biasamp_vs_perfect",
    "align_gap_vs_perfect",
    "biasamp_at",
    "gen_aligned_frac",
    "gen_attr_tv",
    "gen_class_tv",
    "gen_ref_acc",
    "gen_biasamp",
)


def bias(runs: list[Path]) -> None:
    """Bias metrics per generator generation and alpha (mean ± 95% over seeds), one table per run."""
    for run in runs:
        config, rows, _ = _rows(run)
        real = real_only(rows)
        print(f"## {run_label(run, config)} ({run})\n\n{_intervals(config, len(config.get('seeds') or []))}")
        print("\n".join(common.table(["alpha", "generation", *BIAS])))
        if real:
            print(common.row(["0 (real only)", "-", *(_cell([r.get(m) for r in real]) for m in BIAS)]))
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get("mode") == "generations":
                groups[r["ratio"], r["gen_t"]].append(r)
        for (alpha, t), rs in sorted(groups.items()):
            print(common.row([f"{alpha:g}", t, *(_cell([r.get(m) for r in rs]) for m in BIAS)]))
        real_frac = next(
            (r.get("real_aligned_frac") for r in rows if r.get("real_aligned_frac") is not None), None
        )
        if real_frac is not None:
            print(f"\nreal training images aligned with their class's colour: {real_frac:.4f}\n")


def figures(name: str, runs: list[Path], out: Path = ROOT / "figures") -> None:
    """Draw the runs' figures (into the first run's figures/); copy them to out/contamination_<name>_*.png."""
    out.mkdir(parents=True, exist_ok=True)
    for path in draw(runs, runs[0] / "figures"):
        target = out / f"contamination_{name}_{path.name}"
        write_atomic(target, path.read_bytes(), durable=False)
        where = target.resolve()
        print(where.relative_to(ROOT) if where.is_relative_to(ROOT) else target)


def main(argv: Sequence[str] | None = None) -> None:
    """substitute RUN | robustness RUN | bias RUN [RUN ...] | figures NAME RUN [RUN ...] [--out DIR]."""
    parser = common.parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command, what in (("substitute", "accuracy vs alpha, generated vs control"),
                          ("robustness", "effective robustness per mode and ratio")):  # fmt: skip
        commands.add_parser(command, help=what).add_argument("run", type=Path, help="a run directory")
    bias_runs = commands.add_parser("bias", help="bias per generation (a run per loop)")
    bias_runs.add_argument("runs", type=Path, nargs="+", help="run directories")
    drawn = commands.add_parser("figures", help="figures/contamination_NAME_*.png from the runs")
    drawn.add_argument("name", help="the figures' name: contamination_NAME_<figure>.png")
    drawn.add_argument("runs", type=Path, nargs="+", help="run directories")
    drawn.add_argument("--out", type=Path, default=ROOT / "figures", help="where the copies go (figures/)")
    args = parser.parse_args(argv)
    if args.command == "substitute":
        substitute(args.run)
    elif args.command == "robustness":
        robustness(args.run)
    elif args.command == "bias":
        bias(args.runs)
    else:
        figures(args.name, args.runs, args.out)


if __name__ == "__main__":
    common.entry(main)
