"""SIMS (Alemohammad et al. 2024) in the synthetic augmentation loop at CPU scale: FID per generation.

runs/sims_digits/*: the tiny diffusion model of experiment=digits_pretrain (generation 0) fine-tuned each
generation on the real digits polluted by lam x n_real of the previous generation's samples; with SIMS
(omega = 1: every generation samples with (1 + omega) s_base - omega s_aux, aux its base fine-tuned on
its own samples) or without (omega null, the same seeds). Per (lam, generation): the FID (tiny
extractor) of each regime, SIMS minus standard paired by seed, and SIMS's change from its previous
generation (the paper's self-improvement), each with a 95% Student-t interval over the seeds.

Usage: python experiments/sims/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from simulator.stats import student_t_band
from simulator.strict_json import number

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402

PAPER = ("SIMS (Section 4.2.2, synthetic augmentation loop): the second-generation SIMS model beats the "
         "first-generation one while the pollution |D_p| < 30k (60% of |D_r|) on CIFAR-10 and < 15k (20%) on "
         "FFHQ-64; the standard model degrades as |D_p| grows")  # fmt: skip


def cell(b: object) -> str:
    return f"{b.mean:+.3g} ± {b.half:.2g}"  # type: ignore[attr-defined]


def main() -> None:
    args = common.arguments(__doc__)
    runs = common.runs_under(args.runs, "sims_digits")
    fid: dict[tuple[float, bool, int], list[float]] = {}
    for run in runs:
        omega = run.config["mitigation"]["sims"]["omega"]
        key = (float(run.config["policy"]["lam"]), omega is not None, int(run.config["seed"]))
        fid[key] = [number(r.get("fid")) for r in run.rows]
    lams, seeds = sorted({k[0] for k in fid}), sorted({k[2] for k in fid})
    missing = [(lam, s, r) for lam in lams for s in (False, True) for r in seeds if (lam, s, r) not in fid]
    if missing:
        raise common.AnalysisError(
            f"runs missing for (lam, sims, seed) {missing[:3]}: rerun experiments/sims/run.sh"
        )
    gens = min(len(v) for v in fid.values())
    fig, axes = common.subplots(1, len(lams), figsize=(4.6 * len(lams), 3.6), squeeze=False)
    header = ["pollution lam = size of D_p / size of D_r", "generation",
              f"FID standard (mean ± 95% t, {len(seeds)} seeds)", "FID SIMS",
              "SIMS − standard (paired)", "SIMS: change from previous generation"]  # fmt: skip
    lines = ["# SIMS at CPU scale (8x8 digits)", "", f"Paper: {PAPER}.", "", *common.table(header)]
    for j, lam in enumerate(lams):
        std = np.array([[fid[(lam, False, r)][t] for r in seeds] for t in range(gens)])  # (T, seeds)
        sims = np.array([[fid[(lam, True, r)][t] for r in seeds] for t in range(gens)])
        for t in range(gens):
            a, b = student_t_band(std[t]), student_t_band(sims[t])
            step = cell(student_t_band(sims[t] - sims[t - 1])) if t else ""
            both = [f"{a.mean:.4g} ± {a.half:.2g}", f"{b.mean:.4g} ± {b.half:.2g}"]
            lines.append(common.row([f"{lam:g}", t, *both, cell(student_t_band(sims[t] - std[t])), step]))
        ax = axes[0, j]
        common.band(ax, range(gens), std, color="C3", label="standard")
        common.band(ax, range(gens), sims, color="C0", label="SIMS (omega = 1)")
        ax.set_title(f"|D_p| = {lam:g} |D_r|", fontsize=9)
        ax.set_xlabel("generation")
        ax.set_ylabel("FID (tiny extractor)")
        ax.legend(fontsize=7)
    fig.suptitle(f"SIMS in the synthetic augmentation loop, 8x8 digits: mean and 95% Student-t band over "
                 f"{len(seeds)} seeds", fontsize=9)  # fmt: skip
    common.save_figure(fig, args.out / "sims_digits.png")
    common.write_lines(args.out / "sims.md", lines)
    print(f"wrote {args.out}/sims.md, sims_digits.png")


if __name__ == "__main__":
    common.entry(main)
