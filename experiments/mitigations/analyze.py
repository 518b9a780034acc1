"""The mitigations side by side: each arm's paired effect against fully synthetic retraining (replace).

Usage: python experiments/mitigations/analyze.py [--runs runs] [--out figures]

For each sweep of experiments/mitigations/run.sh (mitigations_2d: KL to the truth; mitigations_digits: FID),
each arm's stability metric over its last generations (the mean of the last k = 4 of 2-D's 12, the last
one of digits' 3) is divided by replace's of the same seed (the arms share the data, generation 0 and the
seed); the table gives the geometric mean of that ratio over the seeds with its 95% Student-t interval
(on the log), and the same ratio to the real-only floor. Written to <out>/mitigations.md; the verdicts
and the stability figures are the sweeps' own reports (simulate-report), copied by run.sh.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from simulator.report import regime_label  # noqa: E402
from simulator.stats import student_t_interval  # noqa: E402

SWEEPS = {"mitigations_2d": ("kl_truth", 4), "mitigations_digits": ("fid", 1)}  # metric, last k generations


def last(run: common.Run, metric: str, k: int) -> float:
    values = [v for v in common.column(run.rows, metric)[-k:] if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def ratio(arm: dict[int, common.Run], ref: dict[int, common.Run], metric: str, k: int) -> str:
    """Geometric mean over the paired seeds of arm / ref, with its 95% Student-t interval."""
    logs = [math.log(last(arm[s], metric, k) / last(ref[s], metric, k)) for s in sorted(set(arm) & set(ref))]
    m, h, n = student_t_interval(logs)
    if not n:
        return "--"
    return f"{math.exp(m):.3f} [{math.exp(m - h):.3f}, {math.exp(m + h):.3f}]"


def main(argv: list[str] | None = None) -> None:
    args = common.arguments(__doc__, argv)
    lines = ["# The mitigations side by side", ""]
    for sweep, (metric, k) in SWEEPS.items():
        if not (args.runs / sweep).exists():
            continue
        arms = common.group(common.runs_under(args.runs, sweep), lambda r: regime_label(r.config))
        seeds = {label: common.by_seed(runs) for label, runs in arms.items()}
        replace = next((s for label, s in seeds.items() if label.startswith("replace (")), None)
        floor = next((s for label, s in seeds.items() if label.startswith("real only")), None)
        if replace is None or floor is None:
            raise common.AnalysisError(f"{args.runs / sweep}: needs the replace and real_only arms")
        lines += [f"## {sweep}: {metric}, mean of the last {k} generation(s), paired by seed", ""]
        header = ["arm", "seeds", f"{metric} (mean)", "/ replace [95%]", "/ real only [95%]"]
        rows = []
        for label, by in seeds.items():
            mean = sum(last(r, metric, k) for r in by.values()) / len(by)
            paired = [ratio(by, replace, metric, k), ratio(by, floor, metric, k)]
            rows.append([label, len(by), f"{mean:.4g}", *paired])
        lines += [*common.table(header, rows), ""]
    if len(lines) == 2:
        raise common.AnalysisError(f"{args.runs}: holds neither {' nor '.join(SWEEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(common.write_lines(args.out / "mitigations.md", lines))


if __name__ == "__main__":
    common.entry(main)
