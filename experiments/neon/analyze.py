"""Neon (Alemohammad et al. 2025) at CPU scale: the merge weight w against the Frechet distance / FID.

2-D toy (runs/neon_toy/*): the flow of experiment=neon_toy_base, sampled at temperature 1/zeta, merged
with its copy fine-tuned on its own samples from that sampler; generation 0's `frechet` (squared W2 of
Gaussian fits of 20,000 samples and 20,000 held-out points) per (zeta, w, seed). Digits
(runs/neon_digits/*, when present): generation 0's FID (tiny extractor) per (w, seed).
Every w is paired with w = 0
on the same seed (the same base, self-samples, fine-tune and evaluation draws: only w differs), and the
differences get 95% Student-t intervals over the seeds (simulator.stats.student_t_band).

Usage: python experiments/neon/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simulator.stats import student_t_band
from simulator.strict_json import number

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402

PAPER = ("Neon repository table (EDM, 50k samples): CIFAR-10 unconditional FID 1.98 -> 1.38 (-30%), "
         "conditional 1.78 -> 1.38, FFHQ-64 2.39 -> 1.12 (-53%); the toy notebook's argument: w > 0 "
         "corrects a mode-seeking sampler")  # fmt: skip


def grid(
    runs: list[Run], metric: str, setting_of: Callable[[Run], float | None]
) -> tuple[dict[float | None, np.ndarray], list[float], list[int]]:
    """{setting: (W, seeds) values of generation 0's metric}, the w values and the seeds; setting: what
    setting_of reads from a run's config (the sampler's temperature; None: one setting)."""
    cells: dict[tuple, float] = {}
    for run in runs:
        neon = run.config["mitigation"]["neon"]
        cells[(setting_of(run), float(neon["w"]), int(run.config["seed"]))] = number(run.rows[0].get(metric))
    settings = sorted({k[0] for k in cells}, key=lambda s: -1 if s is None else s)
    ws, seeds = sorted({k[1] for k in cells}), sorted({k[2] for k in cells})
    missing = [(s, w, r) for s in settings for w in ws for r in seeds if (s, w, r) not in cells]
    if missing:
        raise common.AnalysisError(
            f"runs missing for (setting, w, seed) {missing[:3]}: rerun experiments/neon/run.sh"
        )
    if 0.0 not in ws:
        raise common.AnalysisError("no w = 0 runs: the pairing needs the base")
    return {s: np.array([[cells[(s, w, r)] for r in seeds] for w in ws]) for s in settings}, ws, seeds


def rows_of(values: np.ndarray, ws: list[float], label: str) -> list[list[str]]:
    """Table rows: w, the mean ± 95% half width over seeds, and the paired change from w = 0."""
    base = values[ws.index(0.0)]
    out = []
    for i, w in enumerate(ws):
        b, d = student_t_band(values[i]), student_t_band(values[i] - base)
        rel = student_t_band(100 * (values[i] - base) / base)
        out.append([label, f"{w:g}", f"{b.mean:.4g} ± {b.half:.2g}", f"{d.mean:+.4g} ± {d.half:.2g}",
                    f"{rel.mean:+.1f}% ± {rel.half:.1f}"])  # fmt: skip
    return out


def temperature(run: Run) -> float:
    """The temperature of the run's sampler: its self-samples' and its evaluation's."""
    return float(run.config["sample"]["temperature"])


def toy(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "neon_toy")
    fd, ws, seeds = grid(runs, "frechet", temperature)
    fig, (ax, dax) = common.subplots(1, 2, figsize=(11, 4))
    header = ["sampler (self-samples and evaluation)", "w",
              f"Fréchet distance (mean ± 95% t, {len(seeds)} seeds)", "change from w = 0 (paired)",
              "relative change"]  # fmt: skip
    lines = ["Squared W2 between Gaussian fits of 20,000 samples and of 20,000 held-out points.", "",
             *common.table(header)]  # fmt: skip
    for temp, values in fd.items():
        label = f"temperature {temp:g} (zeta {1 / temp:.2f}: {'mode' if temp < 1 else 'diversity'}-seeking)"
        lines += [common.row(r) for r in rows_of(values, ws, label)]
        common.band(ax, ws, values, label=label, clip=0.2)
        common.band(dax, ws, values - values[ws.index(0.0)], label=label)
    for a in (ax, dax):
        a.axvline(0, color="k", ls=":", lw=0.8)
        a.set_xlabel("merge weight w  (θ = (1+w) θ_base − w θ_self)")
    dax.axhline(0, color="k", lw=0.6)
    dax.set_ylabel("change from w = 0 (paired by seed)")
    ax.set_ylabel("Fréchet distance to held-out points")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.suptitle(f"Neon's 2-D toy with a flow: N(0, [[2,1],[1,2]]), mean and 95% Student-t band over "
                 f"{len(seeds)} seeds", fontsize=9)  # fmt: skip
    common.save_figure(fig, out / "neon_toy.png")
    return lines


def digits(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "neon_digits")
    fid, ws, seeds = grid(runs, "fid", lambda run: None)
    values = fid[None]
    fig, ax = common.subplots(1, 1, figsize=(5, 3.6))
    common.band(ax, ws, values, label="FID (tiny extractor)")
    ax.axvline(0, color="k", ls=":", lw=0.8)
    ax.set_xlabel("merge weight w")
    ax.set_title(f"Neon on 8x8 digits (tiny diffusion), mean and 95% t band, {len(seeds)} seeds", fontsize=9)
    common.save_figure(fig, out / "neon_digits.png")
    header = ["model", "w", f"FID (mean ± 95% t, {len(seeds)} seeds)", "change from w = 0 (paired)",
              "relative change"]  # fmt: skip
    n = runs[0].config["eval"]["n_samples"]
    return [f"### FID of {n:,} samples (tiny extractor), the model's sampler (DDIM, "
            f"{runs[0].config['model']['options']['sample_steps']} steps)", "", *common.table(header),
            *(common.row(r) for r in rows_of(values, ws, "diffusion_tiny"))]  # fmt: skip


def main() -> None:
    args = common.arguments(__doc__)
    text = ["# Neon at CPU scale", "", f"Paper: {PAPER}.", "", "## 2-D toy (experiment=neon_toy)", "",
            *toy(args.runs, args.out)]  # fmt: skip
    images = (args.runs / "neon_digits").is_dir()
    if images:
        text += ["", "## Digits (experiment=neon_digits)", "", *digits(args.runs, args.out)]
    common.write_lines(args.out / "neon.md", text)
    print(f"wrote {args.out}/neon.md, neon_toy.png" + (", neon_digits.png" if images else ""))


if __name__ == "__main__":
    common.entry(main)
