"""The discrete (token) collapse results reproduced: simulation over chains against the closed forms.

Shumailov (runs/tokens_shumailov): per chain, p_t from gen_XXX's model file; the fraction of chains absorbed
(one token left), the token each chain ends on against p_0 (the martingale's absorption probabilities), and
E[p_t(i)] against p_0(i) at every t. Seddik (runs/tokens_seddik/*): E||p_t - p_0||^2 (l2sq_truth) and, under
mix, the deviation from the first generation E||p_t - p_R||^2 (param_dist0^2), per chain from
chain_metrics.pt, against simulator/token_theory.py. Dohmatob (runs/tokens_dohmatob/*): the truth's mass
on the tokens generation 1 lost (lost_mass) against sum_i p_0(i) (1 - q_i)^T, q each chain's decoded
generation 0, and Hutter's law for T real rows. Every band and +- is a 95% Student-t interval over chains
(simulator.stats.student_t_band); z = (chain mean - closed form) / SE over chains.

Usage: python experiments/tokens/analyze.py [--runs runs] [--out figures]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from simulator import token_theory as theory
from simulator.data.tokens import token_probs
from simulator.models.categorical import CategoricalFamily
from simulator.stats import student_t_band

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: experiments.common
from experiments import common  # noqa: E402
from experiments.common import Run  # noqa: E402


def truth(run: Run) -> np.ndarray:
    opts = run.config["data"]["options"]
    return token_probs(int(opts["vocab"]), str(opts["law"]), float(opts["exponent"])).numpy()


def z_of(values: np.ndarray, expected: np.ndarray | float) -> np.ndarray:
    """(chain mean - expected) / SE over chains; values (..., C)."""
    return (values.mean(-1) - expected) / (values.std(-1, ddof=1) / np.sqrt(values.shape[-1]))


def fmt(b: Any, i: int = -1, digits: int = 4) -> str:
    return f"{b.mean[i]:.{digits}g} ± {b.half[i]:.{digits}g}"


# -- Shumailov et al. 2024 -----------------------------------------------------------------------------------


def shumailov(root: Path, out: Path) -> list[str]:
    run = common.runs_under(root, "tokens_shumailov")[0]
    p0, n = truth(run), int(run.config["data"]["n_train"])
    probs = common.stack(common.models(run.path), ["probs"])["probs"]  # (T + 1, C, V)
    t = np.arange(len(probs))
    alive = (probs > 0).sum(-1)  # (T + 1, C)
    absorbed = (alive == 1).mean(1)
    ends = probs[-1]  # one-hot rows where absorbed
    done = alive[-1] == 1
    freq = ends[done].mean(0)
    chains = int(done.sum())
    z_end = (freq - p0) / np.sqrt(p0 * (1 - p0) / chains)
    z_mart = z_of(np.moveaxis(probs, 1, -1), p0[None, :])  # (T + 1, V)
    s0 = float((p0**2).sum())
    collision = (probs**2).sum(-1)  # (T + 1, C)
    # the z of S_t needs chains that still vary: once fewer than 100 are unabsorbed, the chain mean rests on
    # those few (and once none is, S_t = 1 exactly)
    spread = (alive > 1).sum(1) >= 100
    z_col = z_of(collision[spread], theory.collision_replace(s0, n, n, t[spread]))

    plt = common.pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    common.band(ax[0], t, alive.astype(float), color="C0", label="surviving tokens (support)")
    ax[0].set_xlabel("generation")
    ax[0].set_ylabel("tokens with p_t > 0")
    right = ax[0].twinx()
    right.plot(t, absorbed, color="C3", label="fraction of chains absorbed")
    right.set_ylabel("fraction absorbed (one token)", color="C3")
    ax[0].set_title(f"replace, V = {len(p0)} Zipf(1), n = {n}, {probs.shape[1]} chains")
    ax[0].legend(loc="center right")
    ids = np.arange(len(p0))
    half = student_t_band(ends[done], axis=0).half  # 95% Student-t over the absorbed chains
    ax[1].bar(ids - 0.2, p0, width=0.4, color="0.6", label="p_0(i)")
    ax[1].bar(ids + 0.2, freq, width=0.4, yerr=half, color="C0", label="fraction of chains ending on i")
    ax[1].set_xlabel("token i")
    ax[1].set_title(f"absorption = p_0 (martingale): max |z| {np.abs(z_end).max():.2f}")
    ax[1].legend()
    for i, color in zip(range(3), ("C0", "C1", "C2"), strict=True):
        common.band(ax[2], t, probs[:, :, i], color=color, label=f"E p_t({i})")
        ax[2].axhline(p0[i], color=color, ls="--", lw=1)
    ax[2].plot(t, theory.collision_replace(s0, n, n, t), "k--", lw=1, label="Seddik S_t (closed form)")
    common.band(ax[2], t, collision, color="k", alpha=0.15, label="sum_i p_t(i)^2")
    ax[2].set_xlabel("generation")
    ax[2].set_title("E[p_t] = p_0 (dashed) at every t; S_t (Seddik)")
    ax[2].legend(fontsize=8)
    common.save_figure(fig, out / "tokens_shumailov.png")
    return [
        "## Shumailov et al. 2024: the discrete chain is absorbing",
        "",
        f"`simulate experiment=tokens_shumailov` (V = {len(p0)} Zipf(1), n = {n}, {probs.shape[1]} chains, "
        f"{len(t) - 1} generations): {absorbed[-1]:.4f} of the chains absorbed.",
        "",
        *common.table(
            ["quantity", "closed form", "measured", "max |z|"],
            [
                [
                    "P(end on token 0)",
                    f"{p0[0]:.4f}",
                    f"{freq[0]:.4f} ± {half[0]:.4f}",
                    f"{np.abs(z_end).max():.2f}",
                ],
                ["E p_t(i), every t and i", "p_0(i)", "-", f"{np.abs(z_mart).max():.2f}"],
                [
                    f"S_t = E sum p_t^2, t <= {int(t[spread][-1])} (>= 100 chains unabsorbed)",
                    "1 - (1-1/n)^(t+1) (1 - s_0)",
                    f"{collision[spread][-1].mean():.4f} at t = {int(t[spread][-1])}",
                    f"{np.abs(z_col).max():.2f}",
                ],
            ],
        ),
        "",
    ]


# -- Seddik et al. 2024 -----------------------------------------------------------------------------------


def predicted(run: Run, s0: float, t: np.ndarray) -> tuple[str, np.ndarray, np.ndarray | None, float]:
    """(label, E||p_t - p_0||^2, E||p_t - p_R||^2 or None, synthetic share alpha) of a tokens_seddik run."""
    pol, n0 = run.config["policy"], int(run.config["data"]["n_train"])
    if pol["name"] == "replace":
        return "replace", theory.l2sq_replace(s0, n0, n0, t), None, 1.0
    if pol["name"] == "mix":
        k = round(float(pol["lam"]) * n0)
        return (
            f"mix lambda={pol['lam']:g}",
            theory.l2sq_mix(s0, n0, k, t),
            theory.mix_deviation(s0, n0, k, t),
            k / (n0 + k),
        )
    big_n, m = int(pol["n_real"]), int(pol["n_syn"])
    return (f"fresh N={big_n} m={m}", theory.l2sq_fresh(s0, n0, big_n, m, int(t[-1])), None, m / (big_n + m))


def seddik(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "tokens_seddik")
    plt = common.pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    rows, share = [], {"mix": [], "fresh": []}
    for i, run in enumerate(runs):
        p0 = truth(run)
        s0 = float((p0**2).sum())
        err = common.chain_metric(run.path, "l2sq_truth").astype(float)  # (T + 1, C)
        t = np.arange(len(err))
        label, expect, dev_expect, alpha = predicted(run, s0, t)
        color = f"C{i % 10}"
        b = common.band(ax[0], t, err, color=color, label=label)
        ax[0].plot(t, expect, color=color, ls="--", lw=1)
        z = z_of(err, expect)
        zdev = np.nan
        if dev_expect is not None:
            dev = common.chain_metric(run.path, "param_dist0").astype(float) ** 2
            common.band(ax[1], t, dev, color=color, label=label)
            ax[1].plot(t, dev_expect, color=color, ls="--", lw=1)
            zdev = float(np.abs(z_of(dev[1:], dev_expect[1:])).max())
        if label != "replace":
            share[label.split()[0]].append((alpha, b.mean[-1], b.half[-1], expect[-1]))
        rows.append(
            [
                label,
                f"{alpha:.3f}",
                f"{expect[-1]:.5f}",
                fmt(b),
                f"{np.abs(z).max():.2f}",
                "-" if np.isnan(zdev) else f"{zdev:.2f}",
            ]
        )
    ax[0].set_yscale("log")
    ax[0].set_xlabel("generation")
    ax[0].set_ylabel("E ||p_t - p_0||^2 (dashed: closed form)")
    ax[0].set_title(f"V = {len(p0)} Zipf(1), n = {runs[0].config['data']['n_train']}, {err.shape[1]} chains")
    ax[0].legend(fontsize=7)
    ax[1].set_xlabel("generation")
    ax[1].set_ylabel("E ||p_t - p_R||^2, p_R the real fit (dashed: closed form)")
    ax[1].set_title("mix: the deviation from generation 0 stays bounded")
    ax[1].legend(fontsize=7)
    n0 = int(runs[0].config["data"]["n_train"])
    grid = np.linspace(0.01, 0.99, 99)
    last = len(t) - 1
    for name, color in (("mix", "C0"), ("fresh", "C3")):
        pts = sorted(share[name])
        if name == "mix":  # k = alpha n0 / (1 - alpha)
            curve = [theory.l2sq_mix(s0, n0, max(1, round(a * n0 / (1 - a))), last) for a in grid]
        else:
            big_n = int(
                next(r for r in runs if r.config["policy"]["name"] == "fresh").config["policy"]["n_real"]
            )
            curve = [
                theory.l2sq_fresh(s0, n0, big_n, max(1, round(a * big_n / (1 - a))), last)[-1] for a in grid
            ]
        ax[2].plot(grid, curve, color=color, ls="--", lw=1, label=f"{name}: closed form at t = {last}")
        if pts:
            a, m, h, _ = map(np.array, zip(*pts, strict=True))
            ax[2].errorbar(a, m, yerr=h, fmt="o", color=color, label=f"{name}: simulated")
    ax[2].axhline((1 - s0) / n0, color="0.5", lw=1, label="real fit alone, (1 - s_0)/n")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("synthetic share alpha = n_syn / (n_real + n_syn)")
    ax[2].set_ylabel(f"E ||p_t - p_0||^2 at t = {last}")
    ax[2].legend(fontsize=7)
    common.save_figure(fig, out / "tokens_seddik.png")
    return [
        "## Seddik et al. 2024: fully synthetic, mixed and fresh retraining",
        "",
        "`simulate experiment=tokens_seddik policy=...` (experiments/tokens/run.sh). The error at the last "
        "generation, closed form and measured (95% Student-t over chains), and the largest |z| over all "
        "generations:",
        "",
        *common.table(
            ["policy", "alpha", "closed form", "measured", "max |z| error", "max |z| deviation"], rows
        ),
        "",
    ]


# -- Dohmatob et al. 2024 -----------------------------------------------------------------------------------


def cut_of(run: Run) -> tuple[str, dict[str, Any]]:
    opts = run.config["model"]["options"]
    if run.config["policy"]["name"] != "replace":  # policy=real_only (mix with lam 0): T real rows
        return "real", {}
    if opts.get("top_k") is not None:
        return f"top-k {opts['top_k']}", {"top_k": int(opts["top_k"])}
    if opts.get("top_p") is not None:
        return f"top-p {opts['top_p']:g}", {"top_p": float(opts["top_p"])}
    return "no cut", {}


def dohmatob(root: Path, out: Path) -> list[str]:
    runs = common.runs_under(root, "tokens_dohmatob")
    curves: dict[str, list[tuple[int, Any, float, float, float]]] = {}
    p0 = truth(runs[0])
    for run in runs:
        label, options = cut_of(run)
        lost = common.chain_metric(run.path, "lost_mass").astype(float)
        support = common.chain_metric(run.path, "support_size").astype(float)
        if label == "real":  # generation 0: T = n_train real rows, Hutter's law exactly
            rows = int(run.config["data"]["n_train"])
            expect = np.full(lost.shape[1], theory.lost_mass(p0, p0, rows))
            values, sup = lost[0], support[0]
        else:
            rows = int(run.config["policy"]["n_syn"])
            g0 = CategoricalFamily.from_probs(common.models(run.path)[0]["probs"], **options)
            expect = theory.lost_mass(p0, g0.sampling_probs().numpy(), rows)  # each chain's own expectation
            values, sup = lost[1], support[1]
        b = student_t_band(values)
        diff = values - expect
        # once T rows see every token q gives mass, the error is the cut tail's mass on every chain: the
        # difference is float rounding (1e-13), and a z would divide it by a rounding-sized SE
        exact = diff.std(ddof=1) / np.sqrt(len(diff)) < 1e-9
        z = np.nan if exact else float(z_of(diff, 0.0))
        curves.setdefault(label, []).append((rows, b, float(expect.mean()), z, float(sup.mean())))
    plt = common.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"real": "k", "no cut": "C0", "top-k 100": "C3", "top-p 0.9": "C2"}
    table_rows = []
    beta = float(runs[0].config["data"]["options"]["exponent"])
    for label, pts in sorted(curves.items()):
        pts.sort(key=lambda p: p[0])
        t = np.array([p[0] for p in pts])
        m = np.array([p[1].mean for p in pts])
        h = np.array([p[1].half for p in pts])
        color = colors.get(label, None)
        ax[0].errorbar(t, m, yerr=h, fmt="o", color=color, label=f"{label} (simulated)")
        ax[0].plot(t, [p[2] for p in pts], color=color, ls="--", lw=1)
        ax[1].plot(t, [p[4] for p in pts], "o-", color=color, label=label)
        for p in pts:
            table_rows.append(
                [
                    label,
                    p[0],
                    f"{p[2]:.5f}",
                    f"{p[1].mean:.5f} ± {p[1].half:.5f}",
                    "exact (SE < 1e-9)" if np.isnan(p[3]) else f"{p[3]:+.2f}",
                    f"{p[4]:.1f}",
                ]
            )
    ts = np.logspace(2, np.log10(30000), 50)
    hutter = ts ** -(1 - 1 / beta)
    ax[0].plot(
        ts,
        hutter * theory.lost_mass(p0, p0, 1000) / 1000 ** -(1 - 1 / beta),
        color="0.6",
        lw=3,
        alpha=0.4,
        label=f"T^-(1 - 1/beta), beta = {beta:g}",
    )
    ax[0].axhline(theory.tail_beyond(p0, 100), color="C3", lw=1, ls=":", label="p_0 mass beyond rank 100")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("T: rows the next generation fits")
    ax[0].set_ylabel("error: p_0 mass on unseen tokens")
    ax[0].set_title(f"Zipf({beta:g}) over V = {len(p0)}: the cut tail stops the scaling law")
    ax[0].legend(fontsize=7)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("T")
    ax[1].set_ylabel("surviving tokens (support) of the next generation")
    ax[1].legend(fontsize=7)
    common.save_figure(fig, out / "tokens_dohmatob.png")
    return [
        "## Dohmatob et al. 2024: cutting the tail when sampling",
        "",
        "`simulate experiment=tokens_dohmatob policy.n_syn=T [model.options.top_k=100 | top_p=0.9]`, and "
        "`policy=real_only data.n_train=T` (real rows). z: the chains' mean against the mean of each "
        "chain's exact conditional expectation sum_i p_0(i) (1 - q_i)^T.",
        "",
        *common.table(["data", "T", "closed form", "measured", "z", "support"], table_rows),
        "",
    ]


def main() -> None:
    args = common.arguments(__doc__)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Token collapse: simulation against closed forms",
        "",
        "Made by `experiments/tokens/run.sh` (`python experiments/tokens/analyze.py`).",
        "",
    ]
    for part in (shumailov, seddik, dohmatob):
        lines += part(args.runs, args.out)
    common.write_lines(args.out / "tokens.md", lines)
    print(f"wrote {args.out}/tokens_*.png and {args.out / 'tokens.md'}")


if __name__ == "__main__":
    common.entry(main)
