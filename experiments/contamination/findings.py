"""The statistical tests behind the wording of the contamination findings (experiments/contamination/README).

    python experiments/contamination/findings.py           # from the committed numbers (findings.json)
    python experiments/contamination/findings.py RUN       # from a digits_alpha run directory's per-seed rows
    python experiments/contamination/findings.py RUN BLUR  # ... and a control-only run of the same seeds
    python experiments/contamination/findings.py perfect   # a perfect classifier's BiasAmp, two formulas

From the committed numbers. Each README value is a mean over n = 3 seeds with a 95% Student-t half-width h;
for a paired difference that is exactly a one-sample t-test of the per-seed differences against 0:
se = h / t_{0.975, n-1}, t = mean / se, two-sided p with n - 1 degrees of freedom. Every family of
comparisons is Holm-adjusted (family-wise 5%) over its own count, printed with it. Two tests need more than
one cell's mean and half-width, and get rigorous bounds instead:
- the trend over alpha (per-seed least-squares slope of the gap on alpha, t-test of the slopes): the
  slopes' sample standard deviation is at most sum_j |w_j| s_j (w_j the least-squares weights, s_j each
  alpha's per-seed standard deviation; the triangle inequality for the sample standard deviation), so
  |t| >= |mean slope| / (sum_j |w_j| s_j / sqrt(n)) and p is at most the p of that bound;
- a paired contrast of two marginal means (the held-out control minus real only): the paired standard
  deviation lies between |s_1 - s_2| and s_1 + s_2, so its half-width lies between those bounds.
Where the values of a comparison do not spread at all (three seeds losing the same number of test images),
the t-test is undefined; the exact two-sided sign test stands in for it (2 / 2^n: 0.25 for n = 3).
Where the values are accuracies on the 359-image test set, the per-seed gaps are whole test images: the
integer triples that reproduce a committed mean and half-width (to their 4 printed decimals) are listed.

From a run directory (python ... RUN): the same tests on the per-seed rows themselves, exact (no bounds),
and the paired change of effective robustness from real only. With a second run of the same seeds holding only
control cells (the README's blurred control: RUN BLUR), also RUN's substitute minus BLUR's control, and BLUR's
control cells' effective robustness against RUN's baseline fits (the same seeds draw the same test shifts).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats

HERE = Path(__file__).resolve().parent
LEVEL = 0.95
ALPHA = 0.05


def quantile(n: int) -> float:
    """t_{0.975, n-1}: a 95% half-width is this many standard errors."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def parse(value: str, scale: float = 1.0) -> tuple[float, float]:
    """(mean, half-width) of a README value 'm ± h', as a fraction (scale 0.01: points; negative: a cost)."""
    m, h = re.fullmatch(r"\s*([+-]?[\d.]+)\s*±\s*([\d.]+)\s*", value).groups()  # type: ignore[union-attr]
    return scale * float(m), abs(scale) * float(h)


def p_value(t: float, df: int) -> float:
    """Two-sided p of a t statistic."""
    if math.isnan(t):
        return 1.0
    return float(2 * stats.t.sf(abs(t), df))


def t_from_interval(mean: float, half: float, n: int) -> tuple[float, float]:
    """(t, p) of the one-sample t-test that a mean with this 95% half-width over n values tests."""
    se = half / quantile(n)
    if se <= 0:  # no spread: the t-test is undefined; every value has the mean's sign (a sign test)
        return math.nan, sign_p(mean, n)
    t = mean / se
    return t, p_value(t, n - 1)


def sign_p(mean: float, n: int) -> float:
    """Two-sided exact sign-test p when all n values are equal (n of one sign; 1 if they are all zero)."""
    return min(1.0, 2 * 0.5**n) if mean else 1.0


def t_test(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, 95% half-width, t, p) of the one-sample t-test of values against 0."""
    n = len(values)
    if n < 2:  # an unfinished grid: nothing to test yet
        return (values[0] if values else math.nan), math.nan, math.nan, 1.0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal values (up to rounding): no t-test, the sign test
        return mean, 0.0, math.nan, sign_p(mean, n)
    se = sd / math.sqrt(n)
    t = mean / se
    return mean, quantile(n) * se, t, p_value(t, n - 1)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over len(ps) comparisons)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out = [0.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def slope_weights(xs: Sequence[float]) -> list[float]:
    """w_j with slope = sum_j w_j y_j for the least-squares line of y on x."""
    mx = sum(xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    return [(x - mx) / sxx for x in xs]


def slope_bound(xs: Sequence[float], means: Sequence[float], halves: Sequence[float], n: int) -> dict:
    """The trend test from per-x means and half-widths alone: mean slope, a lower bound on |t| and an upper
    bound on p (the slopes' sample sd is at most sum |w_j| s_j, whatever the seeds' covariances)."""
    w = slope_weights(xs)
    sds = [h * math.sqrt(n) / quantile(n) for h in halves]
    slope = sum(wj * m for wj, m in zip(w, means, strict=True))
    sd_max = sum(abs(wj) * s for wj, s in zip(w, sds, strict=True))
    t_min = slope / (sd_max / math.sqrt(n))
    return {"slope": slope, "t_min": t_min, "p_max": p_value(t_min, n - 1)}


def contrast_bounds(a: tuple[float, float], b: tuple[float, float], n: int) -> tuple[float, float, float]:
    """(mean of a - b, smallest and largest possible paired 95% half-width) from two marginal intervals."""
    sa, sb = (h * math.sqrt(n) / quantile(n) for _, h in (a, b))
    k = quantile(n) / math.sqrt(n)
    return a[0] - b[0], k * abs(sa - sb), k * (sa + sb)


def whole_images(mean: float, half: float, n: int, n_test: int, span: int = 40) -> list[tuple[int, ...]]:
    """Per-seed gaps in whole test images (k / n_test each) that print as this mean and half-width (4
    decimals): the sums whose mean rounds to it, then every sorted tuple with such a sum."""
    k = quantile(n) / math.sqrt(n)
    found = []
    for total in range(round(mean * n_test * n) - n, round(mean * n_test * n) + n + 1):
        if abs(total / n / n_test - mean) > 5e-5 + 1e-12:
            continue
        centre = total // n
        for head in itertools.combinations_with_replacement(range(centre - span, centre + span + 1), n - 1):
            last = total - sum(head)
            if last < head[-1]:
                continue
            ks = (*head, last)
            m = total / n
            sd = math.sqrt(sum((x - m) ** 2 for x in ks) / (n - 1))
            if abs(k * sd / n_test - half) <= 5e-5 + 1e-12:
                found.append(ks)
    return found


def _fmt_t(t: float) -> str:
    """A t statistic; undefined where the values had no spread (p is then the sign test's)."""
    return "undefined, sign test" if math.isnan(t) else f"{t:.2f}"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _marginal(fam: dict, n: int) -> list[str]:
    """Bounds on the paired contrasts of a family committed only as marginal intervals."""
    base, label = parse(fam["baseline"]["number"]), fam["baseline"]["label"]
    out = [
        f"contrast with {label} ({len(fam['items'])} contrasts); only marginal intervals are committed, so "
        "only bounds on the paired half-width:",
        "",
        "| comparison | mean difference | paired 95% half-width lies in |",
        "|---|---|---|",
    ]
    for it in fam["items"]:
        d, lo, hi = contrast_bounds(parse(it["number"]), base, n)
        out.append(f"| {it['label']} - {label} | {d:+.4f} | [{lo:.4f}, {hi:.4f}] |")
    return out


def _paired(fam: dict, n: int) -> tuple[list[str], list[tuple[str, float]]]:
    """The t-tests of a paired family (Holm over it), the whole-image triples and the trend bound; returns
    the lines and (label, p) per comparison."""
    items = fam["items"]
    parsed = [parse(it["value"], it.get("scale", 1.0)) for it in items]
    tests = [t_from_interval(m, h, n) for m, h in parsed]
    out = [
        "one-sample t-test of the per-seed differences against 0 (two-sided); Holm over this family's "
        f"{len(items)} comparison(s)",
        "",
        f"| comparison | mean ± 95% half-width | t | p | p, Holm ({len(items)}) | resolved |",
        "|---|---|---|---|---|---|",
    ]
    for it, (m, h), (t, p), q in zip(items, parsed, tests, holm([p for _, p in tests]), strict=True):
        mark = "yes" if q < ALPHA else "no"
        out.append(
            f"| {it['label']} | {m:+.4f} ± {h:.4f} | {_fmt_t(t)} | {_fmt_p(p)} | {_fmt_p(q)} | {mark} |"
        )
    if fam.get("n_test"):
        out.append("")
        for it, (m, h) in zip(items, parsed, strict=True):
            ks = whole_images(m, h, n, int(fam["n_test"]))
            shown = "; ".join(str(k) for k in ks[:4]) + (" ..." if len(ks) > 4 else "") or "none"
            out.append(f"- {it['label']}: per-seed gaps, in test images of {fam['n_test']}, that print as "
                       f"{it['value']}: {shown}")  # fmt: skip
    if fam.get("trend"):
        xs = [it["x"] for it in items]
        b = slope_bound(xs, [m for m, _ in parsed], [h for _, h in parsed], n)
        out += [
            "",
            f"trend over alpha in {xs} (per-seed least-squares slope of the gap, t-test of the slopes; "
            f"1 comparison): mean slope {b['slope']:+.4f} per unit alpha; from the committed marginals only "
            f"bounds: |t| >= {abs(b['t_min']):.2f}, p <= {_fmt_p(b['p_max'])} (the exact test needs the "
            "per-seed rows: findings.py RUN)",
        ]
    return out, [(it["label"], p) for it, (_, p) in zip(items, tests, strict=True)]


def committed(path: Path = HERE / "findings.json") -> str:
    """The tests of every committed family of findings.json, as markdown."""
    spec = json.loads(path.read_text())
    n = int(spec["n"])
    out = [f"Tests of the committed numbers ({path.name}; n = {n} seeds per mean, df = {n - 1}).", ""]
    count = 0
    pooled: list[tuple[str, float]] = []  # finding 1's MLP gaps to both controls, one family together
    for fam in spec["families"]:
        out.append(f"## {fam['name']}")
        if fam["kind"] == "marginal":
            out += [*_marginal(fam, n), ""]
            continue
        lines, tests = _paired(fam, n)
        out += [*lines, ""]
        count += len(tests) + bool(fam.get("trend"))
        control = fam["name"].split(" - ")[1].split(",")[0] if " - " in fam["name"] else ""
        if fam["name"].startswith("finding 1, MLP: substitute -") and control.endswith("control"):
            pooled += [(f"{control}, {label}", p) for label, p in tests]
    adjusted = holm([p for _, p in pooled])
    hits = [name for (name, _), q in zip(pooled, adjusted, strict=True) if q < ALPHA]
    out.append(
        f"Finding 1's {len(pooled)} MLP gaps (held-out and blurred control together), Holm over "
        f"{len(pooled)}: resolved: {', '.join(hits) or 'none'} (smallest adjusted p {_fmt_p(min(adjusted))})."
    )
    out.append(
        f"Comparisons tested in all: {count} (t-tests and the trend; marginal contrasts: bounds only)."
    )
    return "\n".join(out)


def _family(name: str, keys: list[Any], diffs: list[dict[Any, float]], fmt: str = "{:+.4f}") -> list[str]:
    """One family of exact paired t-tests (one per key, per-seed differences), Holm over the family."""
    tests = [t_test(list(d.values())) for d in diffs]
    adjusted = holm([p for *_, p in tests])
    header = "| alpha / mode | n | mean ± 95% half-width | t | p | p, Holm | per seed |"
    out = [f"### {name} ({len(keys)} comparisons)", "", header, "|---|---|---|---|---|---|---|"]
    for k, d, (m, h, t, p), q in zip(keys, diffs, tests, adjusted, strict=True):
        seeds = ", ".join(fmt.format(v) for _, v in sorted(d.items()))
        out.append(
            f"| {k} | {len(d)} | {m:+.4f} ± {h:.4f} | {_fmt_t(t)} | {_fmt_p(p)} | {_fmt_p(q)} | {seeds} |"
        )
    return [*out, ""]


def _trend(name: str, alphas: list[float], gaps: dict[float, dict[Any, float]]) -> list[str]:
    """The per-seed least-squares slope of a gap over alpha, t-tested (1 comparison)."""
    seeds = sorted(set.intersection(*(set(g) for g in gaps.values()))) if gaps else []
    if len(alphas) < 2 or len(seeds) < 2:
        return []
    w = slope_weights(alphas)
    slopes = [sum(wj * gaps[a][s] for wj, a in zip(w, alphas, strict=True)) for s in seeds]
    m, h, t, p = t_test(slopes)
    return [
        f"trend of {name} over alpha {alphas} (per-seed least-squares slope, t-test, n = {len(seeds)}; "
        f"1 comparison): {m:+.4f} ± {h:.4f} per unit alpha, t = {t:.2f}, p = {_fmt_p(p)}",
        "",
    ]


def _scored(rows: list[dict[str, Any]], fits: dict[str, Any], mode: str) -> list[str]:
    """A mode's clean and mean shifted accuracy and effective robustness (mean ± 95% half-width over seeds)
    against the fits of the run's own baselines, per ratio, and per shift at each ratio."""
    from simulator.stats import student_t_interval

    def cell(vals: list[Any], sign: str = "") -> str:
        m, h, k = student_t_interval(vals)
        return f"{m:{sign}.4f} ± {h:.4f}" + (f" (n={k})" if k != len(vals) else "")

    cols = ["acc_shift_mean", *(c for c in fits if c != "acc_shift_mean")]
    out = [
        f"### {mode}: scored against the first run's baseline fits",
        "",
        "| ratio | clean | " + " | ".join(f"{c[len('acc_') :]}: acc / ER" for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for ratio in sorted({r["ratio"] for r in rows if r["mode"] == mode}):
        sel = [r for r in rows if r["mode"] == mode and r["ratio"] == ratio]
        accs = " | ".join(
            f"{cell([r.get(c) for r in sel])} / {cell([r.get('er' + c[len('acc') :]) for r in sel], '+')}"
            for c in cols
        )
        out.append(f"| {ratio:g} | {cell([r.get('acc_clean') for r in sel])} | {accs} |")
    return [*out, ""]


def from_run(run: Path, control_run: Path | None = None) -> str:
    """The exact tests of findings 1 and 2 from a grid's per-seed rows: paired gaps per alpha, their trend,
    the control's own cost, effective robustness against real only, each family Holm-adjusted; with a
    control-only run of the same seeds, its gaps and effective robustness too."""
    sys.path.insert(0, str(HERE.parents[1]))
    from simulator.contamination.report import load_rows, with_robustness
    from simulator.strict_json import number

    _, rows = load_rows(run)
    ok = [r for r in rows if r.get("status") == "ok"]
    if control_run is not None:  # its control cells only: RUN's baselines alone make the fits
        _, extra = load_rows(control_run)
        cells = [r for r in extra if r.get("status") == "ok" and r.get("kind") == "contaminated"]
        ok += [{**r, "mode": "control (2nd run)"} for r in cells if r.get("mode") == "control"]
    ok, fits = with_robustness(ok)
    ok = [r for r in ok if r.get("kind") == "contaminated"]

    def by(mode: str, ratio: float, col: str = "acc_clean") -> dict[Any, float]:
        return {r["seed"]: number(r.get(col)) for r in ok if r["mode"] == mode and r["ratio"] == ratio}

    def diff(x: dict[Any, float], y: dict[Any, float]) -> dict[Any, float]:
        return {s: x[s] - y[s] for s in x if s in y}

    zero = by("substitute", 0.0)
    alphas = sorted({r["ratio"] for r in ok if r["mode"] == "control" and r["ratio"] > 0})
    out = [f"## {run}: exact paired tests over seeds (one-sample t-test, two-sided; Holm per family)", ""]
    if control_run is not None:
        out += [f"(control (2nd run): the control cells of {control_run}, the same seeds)", ""]
    controls = ["control"] + (["control (2nd run)"] if control_run is not None else [])
    for ctl in controls:
        gaps = {a: diff(by("substitute", a), by(ctl, a)) for a in alphas}
        out += _family(f"substitute - {ctl}", [f"{a:g}" for a in alphas], list(gaps.values()))
        out += _trend(f"substitute - {ctl}", alphas, gaps)
    for mode in (*controls, "substitute"):
        out += _family(
            f"{mode} - real only", [f"{a:g}" for a in alphas], [diff(by(mode, a), zero) for a in alphas]
        )
    if "acc_shift_mean" in fits:
        er0 = by("substitute", 0.0, "er_shift_mean")
        top = max(alphas) if alphas else 1.0
        augments = sorted({r["ratio"] for r in ok if r["mode"] == "augment"})
        keys = [("substitute", top), *(("augment", r) for r in augments), *((c, top) for c in controls)]
        out += _family(
            "effective robustness (acc_shift_mean) - real only",
            [f"{m} {r:g}" for m, r in keys],
            [diff(by(m, r, "er_shift_mean"), er0) for m, r in keys],
        )
        if control_run is not None:
            out += _scored(ok, fits, "control (2nd run)")
    return "\n".join(out).rstrip()


def perfect_biasamp() -> str:
    """A perfect classifier's Zhao BiasAmp on experiment (b)'s test set against its real training split, as
    bias.py computes it (from p = y) and as (1/|C|) sum (1/2 - b*) over the pairs with b* > 1/2."""
    sys.path.insert(0, str(HERE.parents[1]))
    import torch
    from hydra import compose, initialize_config_dir

    from simulator.cli import CONFIG_DIR
    from simulator.contamination import bias, cli, grid

    overrides = ["contaminate/data=colored_digits", "split.draw=fixed"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("contaminate", overrides=overrides)
    data = cli.load_data(cfg)
    setup = grid.prepare(
        data,
        seed=cfg.seed,
        split_fraction=cfg.split.fraction,
        control_shift=None,
        control_severity=3,
        shift_names=[],
        severity=5,
    )
    k, a = setup.num_classes, setup.num_attrs
    train = bias.counts(setup.real.labels, setup.real.attrs, k, a)
    code = bias.bias_amp_zhao(train, bias.counts(setup.test.labels, setup.test.attrs, k, a))
    b_star = train / train.sum(1, keepdim=True)
    half = float(torch.where(b_star > 1 / a, 1 / a - b_star, torch.zeros_like(b_star)).sum() / k)
    return (
        f"perfect classifier's BiasAmp, real training split ({len(setup.real)} images) vs the balanced test "
        f"set ({len(setup.test)}): {code:.4f} from p = y (bias.py); {half:.4f} as sum (1/2 - b*) / |C|; "
        f"difference {code - half:+.4f}"
    )


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    if arg is None:
        print(committed())
    elif arg == "perfect":
        print(perfect_biasamp())
    else:
        print(from_run(Path(arg), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
