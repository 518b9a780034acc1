"""What the experiments' analyses share: the command line, run directories, intervals, tables and figures.

Every experiments/<name>/analyze.py draws its figures and tables from run directories alone: config.yaml,
results.jsonl and the committed generations gen_XXX/ (model file, samples, per-chain metrics). This module
reads those (Run, runs_under, generations, models, stack, chain_metric, column), groups runs (group,
by_seed), draws a chain or seed mean over its 95% Student-t band (band: simulator.stats.student_t_band),
writes markdown tables (table, row) and whole files (write_text, write_lines, save_figure), and gives every
analysis the same command line (parser, arguments, entry): a missing or empty run folder, an unreadable
file or a bad argument ends in one line on stderr and exit code 2, never a traceback.

An analysis imports it as experiments.common after putting the repository root on sys.path (it runs as
`python experiments/<name>/analyze.py` from the root, where only its own folder is on the path).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from simulator.report import ReportError, find_runs, load_run
from simulator.rundir import write_atomic
from simulator.stats import Band, student_t_band
from simulator.strict_json import number

K = TypeVar("K")
GENERATION = re.compile(r"gen_(\d{3,})")  # gen_XXX.tmp (a generation being written) does not match


class AnalysisError(ReportError):
    """An analysis cannot run on what it was given (one line for the user)."""


# -- the command line -----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with a bad argument reported in one line (not usage + error) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parser(doc: str) -> Parser:
    """A parser described by the first line of an analysis's docstring and named by its usage line
    ("python experiments/<name>/analyze.py"), so that an error line says which analysis refused."""
    usage = re.search(r"python (experiments/\S+\.py)", doc)
    return Parser(prog=usage.group(1) if usage else None, description=doc.splitlines()[0])


def arguments(
    doc: str,
    argv: Sequence[str] | None = None,
    out: str = "figures",
    runs_help: str = "run_root of the experiment's run.sh (default: runs)",
    out_help: str | None = None,
) -> argparse.Namespace:
    """--runs (the run_root the experiment's run.sh wrote into) and --out (where figures and tables go)."""
    p = parser(doc)
    p.add_argument("--runs", default=Path("runs"), type=Path, help=runs_help)
    p.add_argument(
        "--out", default=Path(out), type=Path, help=out_help or f"where the output goes (default: {out})"
    )
    return p.parse_args(argv)


def entry(main: Callable[[], None]) -> None:
    """Run an analysis's main; what the user gave that it cannot read ends in one line and exit code 2."""
    try:
        main()
    except (ReportError, OSError) as e:  # OSError: a file a finished run holds is missing or unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -- run directories ------------------------------------------------------------------------------


class Run(NamedTuple):
    """One run directory: its path, config.yaml and results.jsonl rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]


def load(path: Path) -> Run:
    """The run at path (simulator.report.load_run: a torn last line is skipped, a bad config is an error)."""
    return Run(path, *load_run(path))


def runs_under(root: Path, *names: str) -> list[Run]:
    """The runs under root/name for each name in turn (each name's runs sorted by path); a name with none,
    or missing, is an error naming it."""
    return [load(p) for p in find_runs([root / name for name in names])]


def generations(run: Path) -> list[Path]:
    """The committed generation folders gen_000, gen_001, ... of a run, in generation order."""
    found = [
        (int(m.group(1)), p) for p in run.iterdir() if (m := GENERATION.fullmatch(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def committed(run: Path) -> list[Path]:
    """generations(run), and an error naming the run when it has none."""
    gens = generations(run)
    if not gens:
        raise AnalysisError(f"{run}: no committed generation (gen_000/ is missing)")
    return gens


def models(run: Path, start: int = 0) -> list[dict[str, Any]]:
    """The model state (gen_XXX's model file, either format) of every committed generation from start on."""
    from simulator.weights import load_model

    return [load_model(g) for g in committed(run)[start:]]


def stack(states: Sequence[dict[str, Any]], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """keys of every state as float64 arrays stacked over generations: (T, chains, ...)."""
    return {k: np.stack([s[k].double().numpy() for s in states]) for k in keys}


def chain_metric(run: Path, name: str) -> np.ndarray:
    """Per-chain values (T, C) of a metric from every gen_XXX/chain_metrics.pt, in the stored dtype."""
    import torch

    values = []
    for g in committed(run):
        metrics = torch.load(g / "chain_metrics.pt", weights_only=True)
        if name not in metrics:
            raise AnalysisError(f"{g / 'chain_metrics.pt'}: no {name!r} (the run's eval.metrics left it out)")
        values.append(metrics[name].numpy())
    return np.stack(values)


def column(rows: Sequence[dict[str, Any]], metric: str) -> list[float]:
    """A metric's value in every row, NaN where results.jsonl holds null (not finite) or nothing."""
    return [number(r.get(metric)) for r in rows]


def group(items: Iterable[Run], key: Callable[[Run], K]) -> dict[K, list[Run]]:
    """Runs by key (a regime's seeds, a setting's policies), keys sorted, each group in the given order."""
    out: dict[K, list[Run]] = {}
    for run in items:
        out.setdefault(key(run), []).append(run)
    return {k: out[k] for k in sorted(out)}  # type: ignore[type-var]


def by_seed(items: Iterable[Run]) -> dict[int, Run]:
    """One regime's runs by their seed, in seed order (a repeated seed: the last run given)."""
    seeds = {int(run.config["seed"]): run for run in items}
    return {s: seeds[s] for s in sorted(seeds)}


# -- intervals, tables, figures -------------------------------------------------------------------


def band(
    ax: Any,
    x: Any,
    values: np.ndarray,
    color: str | None = None,
    label: str | None = None,
    alpha: float = 0.25,
    clip: float | None = None,
    **line: Any,
) -> Band:
    """The mean over the last axis of values (chains or seeds) drawn as a line over its 95% Student-t band
    (simulator.stats.student_t_band, returned for the tables); clip keeps the band's lower edge above
    clip x the mean, so that a wide band does not reach zero on a log axis."""
    b = student_t_band(values)
    low = b.mean - b.half if clip is None else np.maximum(b.mean - b.half, clip * b.mean)
    colored = {} if color is None else {"color": color}  # color=None would stop the axes' colour cycle
    ax.plot(x, b.mean, **colored, label=label, **line)
    ax.fill_between(x, low, b.mean + b.half, **colored, alpha=alpha, lw=0)
    return b


def row(cells: Iterable[Any]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[str], rows: Iterable[Iterable[Any]] = ()) -> list[str]:
    """A markdown table's lines: the header, its rule, then one line per row of cells."""
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]


def write_text(path: Path, text: str) -> Path:
    """text written whole: a reader (or a rerun after a kill) never sees half a table."""
    write_atomic(path, text, durable=False)
    return path


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    """The lines, each ending in a newline, written whole."""
    return write_text(path, "".join(f"{line}\n" for line in lines))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: analyses write files and need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """pyplot().subplots: a figure and its axes."""
    return pyplot().subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """fig laid out tight, written whole as a PNG, then closed (figures are made in a loop: free them)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    write_atomic(path, buffer.getvalue(), durable=False)
    return path
