"""Tables and figures of contamination runs, from their run directories alone (results.jsonl, config.yaml).

summarize: effective robustness per shift (fit over the run's real-only classifiers) added to every cell,
  then one table row per (kind, mode, ratio, generator generation, classifier) with the mean over seeds, a
  95% Student-t half-width (simulator.stats) and the n behind the mean: summary.json (with the cells of each
  row) / summary.csv / summary.md. Each says which variances its intervals cover and which they leave out
  (the run's split.draw / split.test, generator and classifier seeds), and which shifts are natural.
load_rows: a run's rows as this version writes them; rows of earlier versions (the cell index under
  "generation", mode "replace" for substitute) are read too.
draw: accuracy vs ratio per mode with the held-out real control (bands over seeds); the effective
  robustness scatter in logit axes with the baseline fit; bias metrics vs generator generation.
"""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from simulator import strict_json
from simulator.contamination.mixing import RENAMED
from simulator.contamination.robustness import (
    add_effective_robustness,
    add_kind_means,
    logit,
    predicted,
    shift_kinds,
)
from simulator.report import _plt, csv_text, load_run, save_figure, write_file
from simulator.stats import student_t_interval

# every key that makes two cells different classifiers (seed and gen_seed are the replicates averaged over)
GROUP_KEYS = (
    "kind",
    "mode",
    "ratio",
    "gen_t",
    "arch",
    "steps",
    "hidden",
    "width",
    "lr",
    "batch_size",
    "optimizer",
    "weight_decay",
    "augment",
)
METRICS = (
    "acc_clean",
    "acc_shift_mean",
    "er_shift_mean",
    "gen_ref_acc",
    "worst_group_acc",
    "align_gap",
    "aligned_acc",
    "conflicting_acc",
    "dp_diff",
    "eo_diff",
    "biasamp",
    "biasamp_at",
    *(
        f"{m}_{s}"
        for m in ("worst_group_acc", "align_gap", "dp_diff", "eo_diff", "biasamp", "biasamp_at")
        for s in ("perfect", "vs_perfect")
    ),
    "train_aligned_frac",
    "gen_aligned_frac",
    "gen_attr_tv",
    "gen_class_tv",
    "gen_biasamp",
    "gen_biasamp_ta",
)
BIAS_PANELS = (
    "acc_clean",
    "worst_group_acc",
    "align_gap",
    "dp_diff",
    "eo_diff",
    "biasamp_at",
    "biasamp_vs_perfect",
    "gen_aligned_frac",
    "gen_attr_tv",
    "gen_class_tv",
    "gen_ref_acc",
    "gen_biasamp_ta",
)


def is_contamination_run(path: Path) -> bool:
    """True for a run directory written by simulate-contaminate (config task: contaminate)."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):  # absent or damaged: not one (the loop report says why it skips it)
        return False
    return isinstance(config, dict) and config.get("task") == "contaminate"


def upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """A row as this version writes it: the cell index under "cell" (earlier versions wrote it under
    "generation", RunDir's loop key, or under both) and the mode by its name today (replace -> substitute)."""
    row = dict(row)
    if "generation" in row:
        cell = row.pop("generation")
        row.setdefault("cell", cell)
    if row.get("mode") in RENAMED:
        row["mode"] = RENAMED[row["mode"]]
    return row


def load_rows(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows) of a contamination run directory, rows upgraded (any version's run reads the same)."""
    config, rows = load_run(path)
    return config, [upgrade(r) for r in rows]


def real_only(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid's real-only contaminated cells (substitute at alpha = 0): every mode's ratio-0 anchor."""
    return [r for r in rows if r.get("kind") == "contaminated" and r.get("mode") == "substitute"
            and r.get("ratio") == 0]  # fmt: skip


def _split(config: dict[str, Any]) -> tuple[str, str]:
    """(split.draw, split.test) of a run's config; runs made before the options existed: fixed, fixed."""
    split = config.get("split") or {}
    return split.get("draw", "fixed"), split.get("test", "fixed")


def _generator_replicated(config: dict[str, Any]) -> bool:
    gen = config.get("generator") or {}
    kind = gen.get("kind", "train")
    return (kind == "train" and gen.get("seed") is None) or (kind == "run" and bool(gen.get("replicates")))


def interval_covers(config: dict[str, Any]) -> list[str]:
    """The sources of variance a summary interval (over replicate seeds) covers, from the run's config."""
    seeds = config.get("seeds") or []
    if len(seeds) < 2:
        return []
    gen = config.get("generator") or {}
    out = []
    if _generator_replicated(config):
        per = "generator" if gen.get("kind", "train") == "train" else "loop run"
        out.append(f"generator training (one {per} per replicate seed)")
    if (config.get("classifier") or {}).get("seed") is None:
        out.append("classifier initialisation, batch order and which real images are replaced")
    draw, test = _split(config)
    if draw == "per_replicate":
        out.append("the classifier/reserve split of the real training images and the test shifts' noise")
    if test == "per_replicate":
        out.append("which images are test images (each replicate its own train/test partition)")
    return out


def interval_leaves_out(config: dict[str, Any]) -> list[str]:
    """What every replicate of the run shares, so that no interval of it covers that variance."""
    seeds = config.get("seeds") or []
    if len(seeds) < 2:
        return ["everything (one replicate)"]
    gen = config.get("generator") or {}
    out = []
    if not _generator_replicated(config):
        out.append("the generator (one for every replicate)" if gen.get("kind") != "external"
                   else "the generated images (one external set)")  # fmt: skip
    if (config.get("classifier") or {}).get("seed") is not None:
        out.append("the classifier's initialisation, batches and replaced images (classifier.seed)")
    draw, test = _split(config)
    if draw == "fixed":
        out.append("the classifier/reserve split and the test shifts (split.draw=fixed: the data seed's)")
    if test == "fixed":
        out.append(
            "the test set (split.test=fixed): absolute accuracies leave out its sampling variance; "
            "differences within a replicate share it"
        )
    return out


def _key(row: dict[str, Any]) -> tuple:
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in GROUP_KEYS)


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell configuration: mean and 95% half-width over seeds of every metric present, with the
    accuracy and effective robustness on every shifted test set."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[_key(r)].append(r)
    out = []
    for members in groups.values():
        first = members[0]
        entry: dict[str, Any] = {k: first.get(k) for k in GROUP_KEYS if first.get(k) is not None}
        entry["seeds"] = len(members)
        entry["cells"] = [r.get("cell") for r in members]
        per_shift = [k for k in dict.fromkeys(k for r in members for k in r) if k.startswith(("acc_", "er_"))]
        for m in dict.fromkeys([*METRICS, *sorted(per_shift)]):  # accuracy and ER per shift too
            if any(r.get(m) is not None for r in members):
                # n: the finite values behind the mean (a None / NaN value is dropped, not counted)
                entry[m], entry[f"{m}_ci"], entry[f"{m}_n"] = student_t_interval([r.get(m) for r in members])
        out.append(entry)
    return out


def with_robustness(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A copy of the rows with the natural / synthetic shift means (where a grid has both) and er_* columns
    for every shift, and the baseline fits."""
    rows = copy.deepcopy(rows)
    add_kind_means(rows)
    return rows, add_effective_robustness(rows)


def summarize(run_path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write summary.json, summary.csv and summary.md of a contamination run; returns the summary."""
    rows, fits = with_robustness(rows)
    tab = table(rows)
    state = json.loads((run_path / "state.json").read_text()) if (run_path / "state.json").exists() else {}
    config_path = run_path / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    covers, leaves = interval_covers(config), interval_leaves_out(config)
    interval = {
        "level": 0.95,
        "kind": "Student-t over replicate seeds",
        "covers": covers,
        "leaves_out": leaves,
        "n": "per mean: the row's seeds, or <metric>_n where fewer values were finite (None / NaN dropped)",
        "note": "; ".join(covers)
        if covers
        else "nothing: one replicate or shared generator and classifier seed",
    }
    kinds = shift_kinds(rows)
    summary = {
        "cells": len(rows),
        "status": state.get("status"),
        "interval": interval,
        "shifts": {**kinds, "note": SHIFT_NOTE},
        "fits": fits,
        "table": tab,
    }
    # each file replaced by a rename (simulator.report.write_file): never half a summary, never through a link
    text = strict_json.dumps(strict_json.strict_row(summary), indent=1, default=str)
    write_file(run_path / "summary.json", text)
    cols = [k for k in dict.fromkeys(k for t in tab for k in t) if k != "cells"]  # (summary.json has them)
    write_file(run_path / "summary.csv", csv_text(cols, tab, extrasaction="ignore"))
    main = [c for c in cols if not c.endswith(("_ci", "_n"))]
    lines = [
        f"Intervals: ±95% Student-t half-width over the replicate seeds; they cover: {interval['note']}; "
        f"they leave out: {'; '.join(leaves) or 'nothing'}. n behind each mean: the row's "
        "`seeds`, or (n=k) where only k values were finite.",
        "",
        "| " + " | ".join(main) + " |",
        "|" + "---|" * len(main),
    ]
    for t in tab:
        cells = [_fmt(t.get(c), t.get(f"{c}_ci"), t.get(f"{c}_n"), t.get("seeds")) for c in main]
        lines.append("| " + " | ".join(cells) + " |")
    shift_note = _shift_lines(kinds)  # under the table: the header stays the third line
    lines += ["", *shift_note] if shift_note else []
    write_file(run_path / "summary.md", "\n".join(lines) + "\n")
    return summary


SHIFT_NOTE = (
    "effective robustness (Taori et al.) is defined for natural shifts (a test set collected anew: "
    "CIFAR-10.1); on synthetic corruptions (computed here, or CIFAR-10-C's) it is read as Bansal & Grover "
    "do; acc_shift_mean / er_shift_mean average every shift, acc_natural_mean / acc_synthetic_mean each kind"
)


def _shift_lines(kinds: dict[str, list[str]]) -> list[str]:
    """The summary.md lines naming the natural and the synthetic shift columns."""
    names = {
        k: ", ".join(c[len("acc_") :] for c in kinds.get(k) or []) or "none" for k in ("natural", "synthetic")
    }
    if names["natural"] == names["synthetic"] == "none":
        return []
    return [f"Shifts: natural: {names['natural']}; synthetic: {names['synthetic']}; {SHIFT_NOTE}."]


def _fmt(v: Any, ci: Any = None, n: Any = None, seeds: Any = None) -> str:
    if isinstance(v, float):
        text = f"{v:.4g}" + (f" ± {ci:.2g}" if isinstance(ci, float) and math.isfinite(ci) and ci > 0 else "")
        return text + (f" (n={n})" if isinstance(n, int) and n != seeds else "")
    return "" if v is None else str(v)


def run_label(path: Path, config: dict[str, Any]) -> str:
    """A short label: the loop policy of a run-dir generator (e.g. 'mix λ=1'), else the directory name."""
    gen = config.get("generator") or {}
    loop_cfg = Path(str(gen.get("run_dir") or (gen.get("replicates") or [""])[0] or "")) / "config.yaml"
    if gen.get("kind") == "run" and loop_cfg.is_file():
        policy = (yaml.safe_load(loop_cfg.read_text()) or {}).get("policy", {})
        name = policy.get("name", "?")
        return f"{name} λ={policy['lam']:g}" if name == "mix" else name
    return f"{config.get('name', '')}/{path.name}" if path.name == "base" else path.name


def _curve(rows: list[dict[str, Any]], metric: str, x_key: str = "ratio") -> tuple[list, list, list]:
    groups: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None and r.get(x_key) is not None:
            groups[r[x_key]].append(r[metric])
    xs = sorted(groups)
    stats = [student_t_interval(groups[x]) for x in xs]
    return xs, [s[0] for s in stats], [s[1] for s in stats]


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _band(ax: Any, xs: list, mean: list, half: list, label: str, style: str = "-", color: Any = None) -> Any:
    (line,) = ax.plot(xs, mean, style, marker="o", ms=3, label=label, color=color)
    lo = [m - (h if math.isfinite(h) else 0) for m, h in zip(mean, half, strict=True)]
    hi = [m + (h if math.isfinite(h) else 0) for m, h in zip(mean, half, strict=True)]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.18)
    return line


def _accuracy_figure(loaded: list, out: Path, plt: Any) -> Path | None:
    """Clean (solid) and mean shifted (dashed) accuracy vs alpha (substitute, control) and vs r (augment)."""
    if not any(
        r.get("mode") in ("substitute", "augment", "control")
        and r.get("kind") == "contaminated"
        and r.get("ratio", 0) > 0
        for _, _, rows, _ in loaded
        for r in rows
    ):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for path, config, rows, _ in loaded:
        prefix = f"{run_label(path, config)}: " if len(loaded) > 1 else ""
        cont = [r for r in rows if r.get("kind") == "contaminated"]
        zero = real_only(rows)  # alpha = r = 0
        for ax, modes in ((axes[0], ("substitute", "control")), (axes[1], ("augment",))):
            for mode in modes:
                sel = [r for r in cont if r["mode"] == mode] + [
                    dict(r, mode=mode) for r in zero if mode != "substitute"
                ]
                if not [r for r in sel if r["ratio"] > 0]:
                    continue
                label = {
                    "substitute": "generated (substitute)",
                    "control": "held-out real (control)",
                    "augment": "real + generated (augment)",
                }[mode]
                line = _band(ax, *_curve(sel, "acc_clean"), f"{prefix}{label}, clean")
                if any(r.get("acc_shift_mean") is not None for r in sel):
                    _band(
                        ax,
                        *_curve(sel, "acc_shift_mean"),
                        f"{prefix}{label}, shifted",
                        "--",
                        line.get_color(),
                    )
    axes[0].set_xlabel("alpha: fraction of each class's real images replaced")
    axes[1].set_xlabel("r: generated images added per real image")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0].set_title("substitute vs the held-out real control (95% bands over seeds)", fontsize=9)
    axes[1].set_title("augment", fontsize=9)
    fig.tight_layout()
    path = out / "accuracy_vs_ratio.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _robustness_figure(loaded: list, out: Path, plt: Any) -> Path | None:
    """Per run: logit shifted vs logit clean accuracy with the baseline fit; and ER vs ratio per mode."""
    with_fit = [x for x in loaded if "acc_shift_mean" in x[3]]
    if not with_fit:
        return None
    fig, axes = plt.subplots(len(with_fit), 2, figsize=(11, 4.2 * len(with_fit)), squeeze=False)
    for (path, config, rows, fits), (ax, ax2) in zip(with_fit, axes, strict=True):
        fit = (fits["acc_shift_mean"]["w"], fits["acc_shift_mean"]["b"])
        base = [r for r in rows if r.get("kind") in ("reference", "baseline")]
        ax.scatter(
            [logit(r["acc_clean"]) for r in base],
            [logit(r["acc_shift_mean"]) for r in base],
            c="gray",
            s=14,
            label=f"real-only baselines ({len(base)})",
        )
        lo = min(logit(r["acc_clean"]) for r in rows) - 0.2
        hi = max(logit(r["acc_clean"]) for r in rows) + 0.2
        ax.plot(
            [lo, hi],
            [logit(predicted(fit, 1 / (1 + math.exp(-x)))) for x in (lo, hi)],
            "k--",
            lw=1,
            label=f"fit: w={fit[0]:.2f}, b={fit[1]:.2f}",
        )
        zero = real_only(rows)
        for mode in ("substitute", "augment", "control", "generations"):
            sel = [
                r for r in rows if r.get("kind") == "contaminated" and r["mode"] == mode and r["ratio"] > 0
            ]
            if sel and mode != "generations":  # ratio 0 (real only) anchors every mode's curve
                _band(ax2, *_curve(sel + zero, "er_shift_mean"), mode)
            if sel:
                ax.scatter(
                    [logit(r["acc_clean"]) for r in sel],
                    [logit(r["acc_shift_mean"]) for r in sel],
                    s=[12 + 18 * r["ratio"] for r in sel],
                    alpha=0.7,
                    label=mode,
                )
        ax.set_xlabel("logit(clean accuracy)")
        ax.set_ylabel("logit(mean shifted accuracy)")
        ax.set_title(f"{run_label(path, config)}: effective robustness (marker size ~ ratio)", fontsize=9)
        _legend(ax)
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set_xlabel("ratio (alpha or r; 0: real only)")
        ax2.set_ylabel("effective robustness (mean shifted accuracy)")
        _legend(ax2)
        for a in (ax, ax2):
            a.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "effective_robustness.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _bias_panels(series: list, x_key: str, xlabel: str, rows: list, path: Path, plt: Any,
                 metrics: tuple[str, ...] = BIAS_PANELS) -> Path | None:  # fmt: skip
    """One panel per bias metric any series has, each series a mean line with its Student-t band over
    seeds against x_key; real data's level dashed where it is one number (the real-only classifiers)."""
    panels = [m for m in metrics if any(r.get(m) is not None for _, rs in series for r in rs)]
    if not panels:
        return None
    ncol = 4
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.8 * nrow), squeeze=False)
    zero = real_only(rows)
    reference = {  # what real data gives, drawn as a dashed line: the level a generation is compared with
        **{m: student_t_interval([r.get(m) for r in zero])[0] for m in panels if not m.startswith("gen_")},
        "gen_aligned_frac": next((r["real_aligned_frac"] for r in rows if r.get("real_aligned_frac")), None),
        "gen_ref_acc": next((r["acc_clean"] for r in rows if r.get("kind") == "reference"), None),
    }
    for ax, metric in zip(axes.flat, panels, strict=False):
        for label, rs in series:
            _band(ax, *_curve(rs, metric, x_key), label)
        level = reference.get(metric)
        if level is not None and math.isfinite(level):
            ax.axhline(level, color="gray", ls="--", lw=1, label="real data (alpha = 0)")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _legend(axes.flat[0])
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _cells(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[tuple]:
    return sorted((r.get("ratio"), r.get("seed"), *(r.get(m) for m in metrics)) for r in rows)


def _bias_figures(loaded: list, out: Path, plt: Any) -> list[Path | None]:
    """Bias metrics vs the generator's generation (mode generations, classifier and generator metrics, one
    line per run and alpha) and vs alpha (mode substitute, real-only cells at alpha = 0, classifier
    metrics only: the generator is the same at every alpha; runs with the same cells share one line)."""
    classifier = tuple(m for m in BIAS_PANELS if not m.startswith("gen_"))
    by_generation: list[tuple[str, list]] = []
    by_alpha: list[tuple[str, list]] = []
    for path, config, rows, _ in loaded:
        label = run_label(path, config)
        contaminated = [r for r in rows if r.get("kind") == "contaminated"]
        gen_rows = [r for r in contaminated if r.get("mode") == "generations"]
        for alpha in sorted({r["ratio"] for r in gen_rows}):
            by_generation.append((f"{label} (alpha={alpha:g})", [r for r in gen_rows if r["ratio"] == alpha]))
        sub_rows = [r for r in contaminated if r.get("mode") == "substitute"]
        has_bias = any(r.get(m) is not None for r in sub_rows for m in classifier[1:])  # beyond acc_clean
        if len({r["ratio"] for r in sub_rows}) < 2 or not has_bias:
            continue
        same = [
            k for k, (_, rs) in enumerate(by_alpha) if _cells(rs, classifier) == _cells(sub_rows, classifier)
        ]
        if same:  # e.g. two loop runs' substitute cells, both drawn from their shared generation 0
            by_alpha[same[0]] = (f"{by_alpha[same[0]][0]}, {label}", by_alpha[same[0]][1])
        else:
            by_alpha.append((label, sub_rows))
    rows = loaded[0][2]
    gen_xlabel, alpha_xlabel = "generator generation", "alpha (share of real images substituted)"
    return [
        _bias_panels(by_generation, "gen_t", gen_xlabel, rows, out / "bias_vs_generation.png", plt)
        if by_generation
        else None,
        _bias_panels(by_alpha, "ratio", alpha_xlabel, rows, out / "bias_vs_alpha.png", plt, classifier)
        if by_alpha
        else None,
    ]


def draw(runs: list[Path], out: Path) -> list[Path]:
    """Every contamination figure the runs have data for, written to out."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = []
    for p in runs:
        config, rows = load_rows(p)
        rows, fits = with_robustness([r for r in rows if r.get("status") == "ok"])
        loaded.append((p, config, rows, fits))
    plt = _plt()
    made = [
        _accuracy_figure(loaded, out, plt),
        _robustness_figure(loaded, out, plt),
        *_bias_figures(loaded, out, plt),
    ]
    return [m for m in made if m is not None]


def report(runs: list[Path], out: Path) -> Path:
    """simulate-report's entry for contamination runs: summaries per run and the figures over all of them."""
    for p in runs:
        summarize(p, load_rows(p)[1])
    draw(runs, out)
    return out
