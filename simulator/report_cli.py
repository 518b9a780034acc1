"""`simulate-report`: figures and tables from run directories of either kind -- the generation loop's
(simulator.report) and simulate-contaminate's grids (simulator.contamination.report).

It reads both, so it sits above both in the layers (docs/architecture.md): the one module outside
contamination/ that imports it, and one that nothing imports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulator import report
from simulator.contamination import report as contamination_report
from simulator.entry import fail


def simulate_report(argv: list[str] | None = None) -> None:
    """Console entry point: `simulate-report RUN_OR_SWEEP_DIR... [--out DIR] [--metric NAME]`."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]  # one line, not usage + error
            fail(f"simulate-report: {message} (see simulate-report --help)")

    parser = Parser(prog="simulate-report", description=report.__doc__)
    parser.add_argument("dirs", nargs="+", help="run directories, or sweep directories holding runs")
    parser.add_argument("--out", default=None, help="where figures and tables go (default: DIR/figures)")
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric for the stability curves, repeatable (default: eval.stability_metric)",
    )
    args = parser.parse_args(argv)
    try:
        runs = report.find_runs([Path(d) for d in args.dirs])
        out = Path(args.out) if args.out else (Path(args.dirs[0]) / "figures")
        grids = [r for r in runs if contamination_report.is_contamination_run(r)]
        if grids:  # simulate-contaminate's grids: accuracy, robustness and bias figures
            print(contamination_report.report(grids, out))
        loops = [r for r in runs if r not in grids]
        if loops:
            print(report.report(loops, out, metric=args.metric))
    except report.ReportError as e:
        fail(str(e))
