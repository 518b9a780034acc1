"""Tables and figures drawn from run directories alone (results.jsonl, config.yaml, gen_*/ samples).

Runs whose configs differ only in the seed are one regime: drawn as a thin line per seed and
a bold mean, and judged together (stability.regime_verdict) against the real-only floor of the
same sweep when it has one; the figure then leads with each regime over that floor.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from simulator import keys, stability
from simulator.rundir import write_atomic
from simulator.strict_json import number

SKIP_COLUMNS = {"generation", "status", "policy", "train", "error", "n_train"}


class ReportError(ValueError):
    """Nothing to report from the given paths (one clear line)."""


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among paths: each path is a run (has results.jsonl) or holds runs below it."""
    runs: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise ReportError(f"{p}: no such directory")
        found = [p] if (p / "results.jsonl").exists() else sorted(
            q.parent for q in p.rglob("results.jsonl") if not any(s.startswith(".rank") for s in q.parts)
        )  # fmt: skip  # .rank<r>/: the mirrors older versions kept of a distributed run
        if not found:
            raise ReportError(f"{p}: no run directory (results.jsonl) in it")
        runs.extend(found)
    return runs


def load_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows) of a run directory. Undecodable lines are skipped (a torn last line is what a killed
    process leaves; others are reported); an unreadable config.yaml is a ReportError naming the file."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"{path / 'config.yaml'}: unreadable ({type(e).__name__})") from None
    if config is not None and not isinstance(config, dict):
        raise ReportError(f"{path / 'config.yaml'}: not a mapping of config keys")
    try:
        lines = (path / "results.jsonl").read_text(errors="replace").splitlines()
    except OSError as e:
        raise ReportError(f"{path / 'results.jsonl'}: unreadable ({e.strerror})") from None
    rows, bad = [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i + 1)
    if bad and bad != [len(lines)]:
        print(f"warning: {path / 'results.jsonl'}: skipped undecodable line(s) {', '.join(map(str, bad))}",
              file=sys.stderr)  # fmt: skip
    return config or {}, rows


def regime_label(config: dict[str, Any]) -> str:
    """A short human label of a run's regime: policy (with lambda), family, temperature, warm start."""
    policy = config.get("policy", {})
    label = policy.get("name", "?")
    if is_floor(config):
        label = "real only (λ=0)"
    elif label == "mix":
        label += f" λ={policy.get('lam'):g}"
    label = " + ".join([label, *mitigation_labels(config)])
    family = config.get("model", {}).get("family")
    temperature = config.get("sample", {}).get("temperature", 1.0)
    extra = [family] if family else []
    if temperature != 1.0:
        extra.append(f"s={temperature:g}")
    if not config.get("train", {}).get("warm_start", True):
        extra.append("scratch")
    return f"{label} ({', '.join(extra)})" if extra else label


def mitigation_labels(config: dict[str, Any]) -> list[str]:
    """What a run does to its samples or models beyond its policy, in words: curation, self-correction,
    verification, entropy selection, Neon and SIMS (so that runs differing only in them are told apart)."""
    sample, mitigation = config.get("sample") or {}, config.get("mitigation") or {}
    out = []
    if sample.get("correction"):
        gamma = sample.get("correction_strength")
        out.append(f"correction={sample['correction']}" + (f" γ={gamma:g}" if gamma is not None else ""))
    if sample.get("label_noise"):
        out.append(f"label noise {sample['label_noise']:g}")
    if sample.get("verifier"):
        out.append(f"verifier={sample['verifier']} k={sample.get('curation_k', 1)}")
    elif (sample.get("curation_k") or 1) > 1:
        out.append(f"curation k={sample['curation_k']}")
    if sample.get("selection"):
        out.append(f"selection={sample['selection']} k={sample.get('selection_k') or 2}")
    neon, sims = mitigation.get("neon") or {}, mitigation.get("sims") or {}
    if neon.get("w") is not None:
        out.append(f"Neon w={neon['w']:g}")
    if sims.get("omega") is not None:
        out.append(f"SIMS ω={sims['omega']:g}")
    return out


def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            derived = k in SKIP_COLUMNS or k.endswith(("_sem", "_nonfinite")) or k.startswith("seconds")
            if not derived and isinstance(v, (int, float)) and not isinstance(v, bool):
                cols[k] = None
    return list(cols)


def write_file(path: Path, data: str | bytes, durable: bool = True) -> None:
    """Replace path by a new file holding data: written under a temporary name in its folder and renamed
    (simulator.rundir.write_atomic), so a reader never sees half a table or figure, and a link planted at
    path -- symbolic or hard -- is replaced, never written through to the file it points to."""
    write_atomic(path, data, durable)


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """fig as a PNG at path: rendered in memory, then written by write_file (never through a link)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_file(path, buf.getvalue())


def csv_text(columns: list[str], rows: list[dict[str, Any]], **options: Any) -> str:
    """rows as CSV text under a header of columns (csv.DictWriter with options), for write_file."""
    buf = io.StringIO(newline="")  # the csv module's own \r\n line ends, as a file opened with newline=""
    writer = csv.DictWriter(buf, fieldnames=columns, **options)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_label(metric: str, config: dict[str, Any]) -> str:
    """A column's name for a figure, with the feature space its metric declares (simulator.metrics.registry):
    Inception pool3 precision/recall are not Kynkaanniemi et al.'s VGG-16 ones, nor the raw-vector ones
    (docs/science.md, Metric identities). The last metric of eval.metrics writing the column wins, as in
    the run's rows."""
    from simulator.metrics import registry as metric_registry

    ev = (config or {}).get("eval") or {}
    for name in reversed(ev.get("metrics") or []):
        declared = metric_registry.declared(name)  # None: a metric this code does not know (an old run's)
        if declared is not None and metric in declared.columns:
            space = declared.feature_space(ev.get("options"))
            return f"{metric} ({space})" if space else metric
    return metric


def draw_run(path: Path) -> list[Path]:
    """A run's own figures: every metric vs generation, and 2-D sample scatter plots per generation."""
    plt = _plt()
    config, rows = load_run(path)
    out = path / "figures"
    out.mkdir(exist_ok=True)
    made = []
    cols = numeric_columns(rows)
    if cols:
        ncol = min(4, len(cols))
        nrow = math.ceil(len(cols) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
        gens = [r["generation"] for r in rows]
        for ax, c in zip(axes.flat, cols, strict=False):
            ax.plot(gens, [number(r.get(c)) for r in rows], marker=".")  # null: not finite
            ax.set_title(metric_label(c, config), fontsize=9)
            ax.set_xlabel("generation", fontsize=8)
        for ax in list(axes.flat)[len(cols) :]:
            ax.axis("off")
        fig.suptitle(f"{regime_label(config)} -- {path.name}", fontsize=10)
        fig.tight_layout()
        save_figure(fig, out / "metrics.png", dpi=110)
        plt.close(fig)
        made.append(out / "metrics.png")
    made += _draw_scatter(path, rows, out, plt)
    return made


def _draw_scatter(path: Path, rows: list[dict[str, Any]], out: Path, plt) -> list[Path]:
    from simulator import samples

    files = [(r["generation"], path / f"gen_{r['generation']:03d}") for r in rows]
    files = [(t, f) for t, f in files if samples.exists(f)]
    if not files:
        return []
    first = samples.load(files[0][1], 1)
    if first.dim() != 3 or first.shape[-1] != 2:
        return []  # scatter plots are for 2-D vectors
    ncol = min(6, len(files))
    nrow = math.ceil(len(files) / ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(2.2 * ncol, 2.2 * nrow), squeeze=False, sharex=True, sharey=True
    )
    lim = None
    for ax, (t, f) in zip(axes.flat, files, strict=False):
        x = samples.load(f, 2000)[0].numpy()
        if lim is None:
            lo, hi = x.min(0), x.max(0)
            pad = 0.25 * (hi - lo)
            lim = (lo - pad, hi + pad)
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
        ax.set_title(f"generation {t}", fontsize=8)
        ax.set_xlim(lim[0][0], lim[1][0])
        ax.set_ylim(lim[0][1], lim[1][1])
    for ax in list(axes.flat)[len(files) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out / "samples.png", dpi=110)
    plt.close(fig)
    return [out / "samples.png"]


def _state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):  # absent or damaged: the table shows no status
        return {}
    return state if isinstance(state, dict) else {}


def _seedless(config: dict[str, Any]) -> str:
    """The config without its seed and the keys that do not change the science: one regime's key."""
    return json.dumps(keys.drop(config, ("seed", *keys.NON_SCIENCE)), sort_keys=True, default=str)


# what a regime is besides its policy: the mitigations (mitigation_labels) -- the keys a run is paired with
# the real-only floor of the same sweep without
REGIME_SAMPLE_KEYS = ("correction", "correction_strength", "correction_options", "selection", "selection_k",
                      "selection_threshold", "selection_decay", "label_noise", "verifier", "verifier_options",
                      "curation_k", "curation_reward", "curation_beta", "curation_options")  # fmt: skip


def _policyless(config: dict[str, Any]) -> str:
    """config without its regime (policy, mitigation and the sample keys of REGIME_SAMPLE_KEYS) or seed:
    equal for a run and the real-only floor it is judged against."""
    sample = {k: v for k, v in (config.get("sample") or {}).items() if k not in REGIME_SAMPLE_KEYS}
    rest = {k: v for k, v in config.items() if k not in ("policy", "mitigation", "sample")}
    return _seedless({**rest, "sample": sample})


def is_floor(config: dict[str, Any]) -> bool:
    """The real-only regime (mix with lambda = 0): every generation retrains on the real data alone."""
    policy = config.get("policy", {})
    return policy.get("name") == "mix" and policy.get("lam") == 0


Run = tuple[Path, dict[str, Any], list[dict[str, Any]]]


def _diverged(p: Path, rows: list[dict[str, Any]]) -> bool:
    return _state(p).get("status") == "diverged" or any(r.get("status") == "diverged" for r in rows)


def _trajectory(rows: list[dict[str, Any]], metric: str, gens: list[int]) -> list[float]:
    """The metric at each of gens: inf after a diverged generation (and where a chain was non-finite),
    nan where the run has not reached the generation yet."""
    by_gen = {r["generation"]: r for r in rows}
    out, dead = [], False
    for t in gens:
        r = by_gen.get(t)
        dead |= r is not None and (r.get("status") == "diverged" or bool(r.get(f"{metric}_nonfinite"))
                                   or metric in (r.get("nonfinite") or []))  # fmt: skip  # null: not finite
        v = r.get(metric) if r is not None else None
        out.append(math.inf if dead else (float(v) if isinstance(v, (int, float)) else math.nan))
    return out


def regime_table(groups: dict[str, list[Run]], metric: str) -> list[dict[str, Any]]:
    """One row per regime: the metric's first and last generation (mean with a Student-t 95% interval
    over seeds) and stability.regime_verdict on its excess over the real-only floor of the same sweep
    (paired by seed) when there is one, else over each run's generation 0."""
    return list(_regime_rows(groups, metric).values())


def _regime_rows(groups: dict[str, list[Run]], metric: str) -> dict[str, dict[str, Any]]:
    """regime_table's rows keyed by group, so the figure can label each regime's lines with its verdict."""
    floors = {_policyless(m[0][1]): m for m in groups.values() if is_floor(m[0][1])}
    table = {}
    for key, members in groups.items():
        config = members[0][1]
        runs = sorted(members, key=lambda m: str(m[1].get("seed")))
        gens = sorted({r["generation"] for _, _, rows in runs for r in rows})
        if not gens:
            continue
        chains = [_trajectory(rows, metric, gens) for _, _, rows in runs]
        reached = [i for i, t in enumerate(gens) if all(not math.isnan(c[i]) for c in chains)]
        gens = [gens[i] for i in reached]  # generations every seed has reached (a sweep still running)
        chains = [[c[i] for i in reached] for c in chains]
        floor = floors.get(_policyless(config))
        paired, reference = None, "generation 0"
        if floor is not None and not is_floor(config):
            seeds = {m[1].get("seed"): m for m in floor}
            paired = [_trajectory(seeds[m[1].get("seed")][2], metric, gens) if m[1].get("seed") in seeds
                      else [math.nan] * len(gens) for m in runs]  # fmt: skip
            reference = "real-only floor"
        v = stability.regime_verdict(chains, floor=paired, generations=gens,
                                     diverged=[_diverged(p, rows) for p, _, rows in runs])  # fmt: skip
        first = stability.t_interval([c[0] for c in chains])
        last = stability.t_interval([c[-1] for c in chains])
        table[key] = {
            "regime": regime_label(config), "seeds": len(runs), "generations": gens[-1] if gens else None,
            "metric": metric, "first": first["mean"], "last": last["mean"], "last_pm": last["half"],
            "reference": reference, "excess_last": v["excess_last"],
            "excess_low": v["excess_last_low"], "excess_high": v["excess_last_high"],
            "change": v["change"], "change_low": v["change_low"], "change_high": v["change_high"],
            "rising": f"{v['rising']}/{v['finite']}", "peak": v["peak"],
            "diverged_fraction": v["diverged_fraction"], "verdict": v["verdict"],
        }  # fmt: skip
    return table


def _write_table(table: list[dict[str, Any]], stem: Path) -> None:
    """stem.csv and stem.md (missing values as empty cells / '-')."""
    columns = list(dict.fromkeys(k for row in table for k in row))
    write_file(stem.with_suffix(".csv"), csv_text(columns, table))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    write_file(stem.with_suffix(".md"), "\n".join(lines) + "\n")


def report(runs: list[Path], out: Path, metric: str | list[str] | None = None) -> Path:
    """Stability figure (the stability metric over the real-only floor first when the sweep has one,
    labelled with each regime's verdict; then per metric the metric vs generation, per regime a thin
    line per seed and the mean), a per-regime verdict table (regimes.csv / regimes.md) and a per-run
    table (summary.csv / summary.md)."""
    loaded = []
    for p in runs:  # a broken run is skipped with one line; the others are still reported
        try:
            loaded.append((p, *load_run(p)))
        except ReportError as e:
            print(f"warning: skipping {p}: {e}", file=sys.stderr)
    if not loaded:
        raise ReportError("no readable run directory among the given paths")
    if metric is None:
        metric = loaded[0][1].get("eval", {}).get("stability_metric") or numeric_columns(loaded[0][2])[0]
    asked = [metric] if isinstance(metric, str) else list(metric)
    metrics = [m for m in asked if any(m in r for _, _, rows in loaded for r in rows)]
    if not metrics:
        raise ReportError(f"metric {', '.join(asked)!r} is in none of the runs' results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create it ({e.strerror})") from None
    groups: dict[str, list[Run]] = defaultdict(list)
    for p, config, rows in loaded:
        groups[_seedless(config)].append((p, config, rows))

    table = []
    for members in groups.values():
        for p, config, rows in members:
            last = rows[-1] if rows else {}
            row = {"run": str(p), "regime": regime_label(config), "seed": config.get("seed"),
                   "generations": last.get("generation"), "status": _state(p).get("status")}  # fmt: skip
            for m in metrics:
                s = stability.summarize(rows, m)
                row.update({f"{m}_first": s["first"], f"{m}_last": s["last"], f"{m}_rho": s["rho"],
                            f"{m}_verdict": s["verdict"]})  # fmt: skip
            table.append(row)
    _write_table(table, out / "summary")
    verdicts = _regime_rows(groups, metrics[0])  # the verdict is on the stability metric
    regimes = list(verdicts.values())
    if regimes:
        _write_table(regimes, out / "regimes")

    _write_tidy(loaded, out)

    plt = _plt()
    floors = any(is_floor(m[0][1]) for m in groups.values()) and len(groups) > 1
    panels = len(metrics) + floors  # the excess over the floor first, then each metric as measured
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.4), squeeze=False)
    colors = {
        key: f"C{i % 10}" for i, key in enumerate(sorted(groups, key=lambda k: regime_label(groups[k][0][1])))
    }
    if floors:  # what the verdicts read: lead with it
        _draw_excess(axes[0, 0], metrics[0], groups, colors, verdicts)
    for ax, m in zip(axes[0, floors:], metrics, strict=True):
        _draw_metric(ax, m, groups, colors)
    fig.tight_layout()
    save_figure(fig, out / "stability.png", dpi=120)
    plt.close(fig)
    return out


def _write_tidy(loaded: list[tuple[Path, dict, list]], out: Path) -> None:
    """results.csv (and results.parquet when pyarrow is installed): one row per run and generation."""
    records = []
    for p, config, rows in loaded:
        for r in rows:
            flat = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
            head = {"run": str(p), "regime": regime_label(config), "seed": config.get("seed")}
            records.append({**head, **flat})
    columns = list(dict.fromkeys(k for rec in records for k in rec))
    write_file(out / "results.csv", csv_text(columns, records))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    try:
        table = pa.table({c: [rec.get(c) for rec in records] for c in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column mixing types: the CSV is the record
        return
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_file(out / "results.parquet", buf.getvalue().to_pybytes())


def _seed_lines(ax: Any, curves: list[dict[int, float]], label: str, color: str, geometric: bool) -> float:
    """One regime: a thin line per seed and a bold line for the mean over seeds at each generation (the
    geometric mean when `geometric`, for ratios); returns the smallest value drawn. Seeds as lines, not
    a band: a band over 3 seeds (t = 4.3) is wide enough to hide where the seeds actually go."""
    lowest = math.inf
    for curve in curves:
        gens = sorted(curve)
        ax.plot(gens, [curve[t] for t in gens], color=color, lw=0.7, alpha=0.4)
        lowest = min([lowest, *curve.values()])
    at: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for t, v in curve.items():
            at[t].append(math.log(v) if geometric else v)
    gens = sorted(at)
    means = [sum(at[t]) / len(at[t]) for t in gens]
    ax.plot(gens, [math.exp(m) for m in means] if geometric else means, marker=".", lw=2.0, color=color,
            label=label)  # fmt: skip
    return lowest


def _draw_metric(ax: Any, metric: str, groups: dict[str, list[Run]], colors: dict[str, str]) -> None:
    """One panel: metric vs generation, per regime a thin line per seed and a bold mean; a log axis when
    every value is above 0."""
    lowest = math.inf
    for key, members in groups.items():
        curves = []
        for _, _, rows in members:
            curve = {r["generation"]: float(r[metric]) for r in rows
                     if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])}  # fmt: skip
            curves.append(curve)
        if not any(curves):
            continue
        label = regime_label(members[0][1]) + (f" ({len(members)} seeds)" if len(members) > 1 else "")
        lowest = min(lowest, _seed_lines(ax, [c for c in curves if c], label, colors[key], geometric=False))
    ax.set_xlabel("generation")
    ax.set_ylabel(metric_label(metric, next(iter(groups.values()))[0][1]) if groups else metric)
    ax.set_yscale("log" if lowest > 0 else "linear")
    ax.set_title(f"{metric} as measured (thin: each seed; bold: mean over seeds)", fontsize=10)
    ax.legend(fontsize=8)


def _draw_excess(
    ax: Any, metric: str, groups: dict[str, list[Run]], colors: dict[str, str],
    verdicts: dict[str, dict[str, Any]],
) -> None:  # fmt: skip
    """One panel: each regime's metric over the real-only floor of the same seed (paired), on a log
    axis (x1 = the floor): a thin line per seed, the geometric mean in bold, and in the legend the
    verdict's change over the run with its 95% interval -- the numbers of regimes.csv."""
    floors = {_policyless(m[0][1]): {c.get("seed"): rows for _, c, rows in m} for m in groups.values()
              if is_floor(m[0][1])}  # fmt: skip
    values: list[float] = []
    for key, members in groups.items():
        floor = floors.get(_policyless(members[0][1]))
        if floor is None or is_floor(members[0][1]):
            continue
        curves = []
        for _, config, rows in members:
            base = {r["generation"]: r.get(metric) for r in floor.get(config.get("seed"), [])}
            curve = {}
            for r in rows:
                v, f = r.get(metric), base.get(r["generation"])
                if isinstance(v, (int, float)) and isinstance(f, (int, float)) and v > 0 and f > 0:
                    if math.isfinite(v / f):
                        curve[r["generation"]] = v / f
            if curve:
                curves.append(curve)
        if curves:
            label = _verdict_label(members[0][1], verdicts.get(key))
            _seed_lines(ax, curves, label, colors[key], geometric=True)
            values += [v for c in curves for v in c.values()]
    ax.axhline(1.0, color="grey", lw=0.8, label="the floor: real only, same seed")
    ax.set_yscale("log")
    _ratio_ticks(ax, values)
    ax.set_xlabel("generation")
    ax.set_ylabel(f"{metric} / real-only {metric}, same seed")
    ax.set_title(f"{metric} over the real-only floor (thin: each seed; bold: geometric mean)\n"
                 "legend: change over the run [95% over seeds], verdict", fontsize=10)  # fmt: skip
    ax.legend(fontsize=8)


def _verdict_label(config: dict[str, Any], row: dict[str, Any] | None) -> str:
    """A regime's legend entry: its label, and the verdict's change with its interval when there is one."""
    label = regime_label(config)
    if row is None or not all(isinstance(row.get(k), float) and math.isfinite(row[k])
                              for k in ("change", "change_low", "change_high")):  # fmt: skip
        return label + (f": {row['verdict']}" if row else "")
    change = f"×{row['change']:.2f} [{row['change_low']:.2f}, {row['change_high']:.2f}]"
    return f"{label}: {change} {row['verdict']}"


def _ratio_ticks(ax: Any, values: list[float]) -> None:
    """Ticks of a log ratio axis written as factors (0.8, 1, 1.25, 2, ...), where a log axis over less
    than a decade would label nothing or one power of ten."""
    from matplotlib.ticker import FixedLocator, NullLocator

    if not values:
        return
    low, high = min(min(values), 1.0), max(max(values), 1.0)
    if high / low > 100:  # a run that blew up: powers of ten
        nice = [10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    else:
        nice = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0,
                10.0, 20.0, 50.0, 100.0]  # fmt: skip
    ticks = [t for t in nice if low / 1.05 <= t <= high * 1.05] or [1.0]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{t:g}" for t in ticks])


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
