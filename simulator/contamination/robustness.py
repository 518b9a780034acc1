"""Effective robustness (Taori et al. 2020; as used by Bansal & Grover 2023) from accuracies alone.

Real-only baseline classifiers (several architectures and training lengths) trace how shifted accuracy
follows clean accuracy. The trend is a straight line in logit space, fitted by least squares:
    logit(acc_shift) ~ w logit(acc_clean) + b,
and a model's effective robustness is how far it sits above that line, in accuracy:
    ER = acc_shift - sigmoid(w logit(acc_clean) + b).
A baseline on the line has ER = 0; a model that is more robust than its clean accuracy predicts has ER > 0.
Accuracies are clipped to [EPS, 1 - EPS] before the logit so a perfect score stays finite.

Taori et al. define it for natural distribution shifts: test sets collected anew, like CIFAR-10.1. Most
shifts here are synthetic corruptions (computed in shifts.py, or CIFAR-10-C's), where it is read the way
Bansal & Grover read it on ImageNet-C-like sets. So ER is fitted and reported per shift (er_<shift>), each
shift is labelled natural or synthetic (shift_kind), and where a grid has both kinds their means are kept
apart (acc_natural_mean, acc_synthetic_mean) besides acc_shift_mean, the mean over every shift.
"""

from __future__ import annotations

import math
from typing import Any

from simulator.strict_json import number

EPS = 1e-4
MIN_POINTS = 6  # baselines needed before a fit is trusted (the "at least six points")


def logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def fit_line(clean: list[float], shifted: list[float]) -> tuple[float, float] | None:
    """Least-squares (w, b) of logit(shifted) on logit(clean); None without 2 distinct clean values."""
    pts = [(logit(c), logit(s)) for c, s in zip(clean, shifted, strict=True) if _finite(c) and _finite(s)]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx <= 1e-12:
        return None
    w = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return w, my - w * mx


def predicted(fit: tuple[float, float], clean: float) -> float:
    """The shifted accuracy the baseline trend predicts for this clean accuracy."""
    w, b = fit
    return sigmoid(w * logit(clean) + b)


def effective_robustness(fit: tuple[float, float] | None, clean: float, shifted: float) -> float:
    """acc_shift - sigmoid(w logit(acc_clean) + b); NaN without a fit."""
    if fit is None or not (_finite(clean) and _finite(shifted)):
        return math.nan
    return shifted - predicted(fit, clean)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


NATURAL = ("cifar10.1",)  # released test sets collected anew (natural shifts); every other shift is synthetic
MEANS = ("shift_mean", "natural_mean", "synthetic_mean")


def shift_kind(column: str) -> str:
    """'natural', 'synthetic' or 'mean' for a shift column (acc_<shift> or er_<shift>; or the bare name)."""
    name = column.split("_", 1)[1] if column.startswith(("acc_", "er_")) else column
    if name in MEANS:
        return "mean"
    return "natural" if name.startswith(NATURAL) else "synthetic"


def shift_kinds(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The rows' shifted-accuracy columns by kind: {"natural": [...], "synthetic": [...]} (means left out)."""
    out: dict[str, list[str]] = {"natural": [], "synthetic": []}
    for col in shift_columns(rows):
        kind = shift_kind(col)
        if kind != "mean":
            out[kind].append(col)
    return out


def add_kind_means(rows: list[dict[str, Any]]) -> None:
    """Where the rows have natural and synthetic shifts, add acc_natural_mean and acc_synthetic_mean (each
    row's mean over its columns of that kind): acc_shift_mean mixes the two. Rows of any version get them,
    since they are made from the acc_<shift> columns alone."""
    kinds = shift_kinds(rows)
    if not (kinds["natural"] and kinds["synthetic"]):
        return
    for r in rows:
        for kind, cols in kinds.items():
            values = [number(r.get(c)) for c in cols]
            if values and all(_finite(v) for v in values):
                r[f"acc_{kind}_mean"] = sum(values) / len(values)


def shift_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The shifted-accuracy columns (acc_<shift>, acc_shift_mean) present in the rows."""
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("acc_") and k not in ("acc_clean",) and not k.startswith("acc_generated"):
                cols[k] = None
    return list(cols)


def add_effective_robustness(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit every shift column over the real-only rows (kind reference/baseline); add er_<shift> to all rows.

    Returns the fits {column: {"w", "b", "points"}}; empty when fewer than MIN_POINTS baselines exist.
    """
    base = [r for r in rows if r.get("kind") in ("reference", "baseline")]
    fits: dict[str, Any] = {}
    if len(base) < MIN_POINTS:
        return fits
    for col in shift_columns(rows):
        fit = fit_line([number(r.get("acc_clean")) for r in base], [number(r.get(col)) for r in base])
        if fit is None:
            continue
        fits[col] = {"w": fit[0], "b": fit[1], "points": len(base)}
        name = "er" + col[len("acc") :]  # acc_shift_mean -> er_shift_mean, acc_jpeg -> er_jpeg
        for r in rows:
            r[name] = effective_robustness(fit, number(r.get("acc_clean")), number(r.get(col)))
    return fits
