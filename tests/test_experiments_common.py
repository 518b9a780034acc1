"""experiments/common.py and the six analyses built on it: each analyze.py's main on a tiny synthetic run
directory (the layout simulate writes: config.yaml, results.jsonl, gen_XXX/ model file, samples and
per-chain metrics, with parameters chosen so the table's numbers are known), its table checked against
values computed here; bad input ends in one line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments import common
from simulator import weights
from simulator.report import ReportError
from simulator.stability import gaussian_expected, golden_ratio_stationary, t_interval
from simulator.stats import student_t_interval

ROOT = Path(__file__).resolve().parents[1]


def analysis(name: str):
    """experiments/<name>/analyze.py as a module."""
    spec = importlib.util.spec_from_file_location(
        f"analyze_{name}", ROOT / "experiments" / name / "analyze.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, config: dict, rows=(), states=(), samples=None, chain_metrics=None) -> Path:
    """A run directory as simulate leaves it: one gen_XXX per state (samples and chain metrics beside)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for t, state in enumerate(states):
        gen = path / f"gen_{t:03d}"
        gen.mkdir()
        weights.save(state, gen / "model.safetensors")
        if samples is not None:
            torch.save(samples[t], gen / "samples.pt")
        if chain_metrics is not None:
            metrics = {k: torch.as_tensor(v[t], dtype=torch.float64) for k, v in chain_metrics.items()}
            torch.save(metrics, gen / "chain_metrics.pt")
    return path


def cell(values, mean_fmt: str, half_fmt: str) -> str:
    """mean ± 95% Student-t half width of values, computed apart from the analyses."""
    m, h, _ = student_t_interval(values)
    return f"{m:{mean_fmt}} ± {h:{half_fmt}}"


def gaussian_states(means, variances, d: int, gens: int) -> list[dict]:
    """gens identical Gaussian states: chain c has mean means[c] (in every coordinate), cov variances[c] I."""
    mean = torch.tensor(means, dtype=torch.float64)[:, None].expand(-1, d).contiguous()
    cov = torch.tensor(variances, dtype=torch.float64)[:, None, None] * torch.eye(d, dtype=torch.float64)
    return [{"mean": mean, "cov": cov} for _ in range(gens)]


def run_main(module, tmp_path: Path) -> Path:
    """module.main on tmp_path/runs, its output in tmp_path/out (returned)."""
    out = tmp_path / "out"
    module.main(["--runs", str(tmp_path / "runs"), "--out", str(out)])
    return out


# -- common ---------------------------------------------------------------------------------------


def test_generations_are_the_committed_folders_in_numeric_order(tmp_path):
    for name in ("gen_999", "gen_1000", "gen_000", "gen_001.tmp", "gen_abc", "figures"):
        (tmp_path / name).mkdir()
    (tmp_path / "gen_002").write_text("a file, not a generation")
    assert [p.name for p in common.generations(tmp_path)] == ["gen_000", "gen_999", "gen_1000"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.AnalysisError, match="no committed generation"):
        common.committed(empty)


def test_tables_groups_and_whole_files(tmp_path):
    assert common.table(["a", "b"], [[1, ""], ["x", 2.5]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 |  |",
        "| x | 2.5 |",
    ]
    runs = [common.Run(Path(f"r{i}"), {"seed": s, "policy": {"name": p}}, [])
            for i, (s, p) in enumerate([(1, "mix"), (0, "replace"), (0, "mix")])]  # fmt: skip
    groups = common.group(runs, lambda r: r.config["policy"]["name"])
    assert list(groups) == ["mix", "replace"] and [r.path.name for r in groups["mix"]] == ["r0", "r2"]
    assert list(common.by_seed(groups["mix"])) == [0, 1]
    path = common.write_lines(tmp_path / "t.md", ["x", "", "y"])
    assert path.read_text() == "x\n\ny\n" and not list(tmp_path.glob("*.tmp"))


def test_band_draws_the_student_t_band_and_returns_it(tmp_path):
    values = np.array([[1.0, 2.0, 4.0], [2.0, 2.0, 2.0]])
    fig, ax = common.subplots()
    b = common.band(ax, [0, 1], values, label="x", clip=0.5)
    m, h, _ = student_t_interval(values[0])
    assert b.mean[0] == pytest.approx(m) and b.half[0] == pytest.approx(h) and b.half[1] == 0
    assert len(ax.lines) == 1 and len(ax.collections) == 1
    low = ax.collections[0].get_paths()[0].vertices[:, 1].min()
    assert low == pytest.approx(0.5 * m)  # clipped: m - h is below zero
    path = common.save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    def refuses():
        raise ReportError(f"{tmp_path}/x: no such directory")

    with pytest.raises(SystemExit) as e:
        common.entry(refuses)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path}/x: no such directory\n"
    with pytest.raises(SystemExit) as e:
        common.arguments("Doc.\n\nUsage: python experiments/x/analyze.py", ["--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: experiments/x/analyze.py: unrecognized arguments: --bogus")
    run = write_run(
        tmp_path / "run", {"seed": 0}, chain_metrics={"kl_truth": [[0.1]]}, states=[{"m": torch.ones(1)}]
    )
    with pytest.raises(common.AnalysisError, match="no 'frechet' .the run's eval.metrics left it out"):
        common.chain_metric(run, "frechet")
    (run / "gen_000" / "model.safetensors").unlink()  # a run damaged by hand
    with pytest.raises(SystemExit) as e:
        common.entry(lambda: common.models(run))
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.startswith("error: ")
        and err.count("\n") == 1
        and "model.safetensors" in err
    )


ANALYSES = ["alemohammad", "bertrand", "gerstgrasser", "shumailov", "golden_ratio", "mitigations"]


@pytest.mark.parametrize("name", ANALYSES)
def test_a_missing_run_folder_is_one_line_and_exit_code_2(name, tmp_path, monkeypatch, capsys):
    module = analysis(name)
    monkeypatch.setattr(
        "sys.argv", ["analyze.py", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit) as e:
        common.entry(module.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "none" in err
    assert not (tmp_path / "o").exists()  # nothing written before the refusal


# -- the analyses ---------------------------------------------------------------------------------


def test_shumailov(tmp_path):
    variances = [0.006, 1.0, 1.5, 1.294]  # mean 0.95: no rounding tie in the 4 digits printed
    for n in (20,):
        for ddof in (0, 1):
            config = {"seed": 0, "chains": 4, "data": {"n_train": n, "options": {"mean": 0.0, "std": 1.0}},
                      "model": {"options": {"ddof": ddof}}}  # fmt: skip
            write_run(tmp_path / "runs" / "shumailov" / f"n={n},ddof={ddof}", config,
                      states=gaussian_states([0.0] * 4, variances, 1, 10))  # fmt: skip
    logdet = [0.3, 0.1]  # log det Sigma_k / det Sigma_true per chain, both components
    covs = torch.stack(
        [0.25 * math.exp(a / 2) * torch.eye(2, dtype=torch.float64).expand(2, 2, 2) for a in logdet]
    )
    weights_ = torch.tensor([[0.5, 0.5], [0.995, 0.005]], dtype=torch.float64)
    means = torch.tensor([[[-1.5, 0.0], [1.5, 0.0]]] * 2, dtype=torch.float64)
    state = {"weights": weights_, "means": means, "covs": covs}
    config = {"seed": 0, "chains": 2, "data": {"n_train": 100, "options": {"std": 0.5}}}
    write_run(tmp_path / "runs" / "shumailov_gmm" / "base", config, states=[state] * 10)
    md = (run_main(analysis("shumailov"), tmp_path) / "shumailov.md").read_text()
    th = gaussian_expected("replace", 20, np.arange(1, 11), ddof=1)["var_ratio"][9]
    assert f"| 1 | 20 | 10 | var_ratio | {cell(variances, '.4g', '.2g')} | {th:.4g} |" in md
    assert "| 0 | 20 | 10 | P(σ_t < 0.1 σ_0) | 0.250 | | |" in md  # one chain of four below 0.1 sigma_0
    approx = gaussian_expected("replace", 50, np.arange(1, 11), d=2, ddof=0)["log_det_shift"][0]
    # chain 1's second component weighs under 1/n: lost, and left out of the live average
    live = [np.mean([0.3, 0.3]), 0.1]
    assert f"| 1 | {cell(live, '.3g', '.2g')} | {approx:.3g} | 0.50 |" in md
    assert (tmp_path / "out" / "shumailov.png").stat().st_size and (
        tmp_path / "out" / "shumailov_gmm.png"
    ).exists()


def test_gerstgrasser(tmp_path):
    runs = tmp_path / "runs"
    variances = [0.8, 1.0, 1.1]
    for policy in ("replace", "accumulate", "accumulate_subsample"):
        config = {"seed": 0, "chains": 3, "policy": {"name": policy},
                  "data": {"n_train": 10, "options": {"dim": 2, "mean": 0.0, "std": 1.0}}}  # fmt: skip
        write_run(
            runs / "gerstgrasser" / policy, config, states=gaussian_states([0.0, 0.1, 0.2], variances, 2, 3)
        )
    kl = {"replace": [[0.1, 0.2], [0.2, 0.3], [0.4, 0.5]], "accumulate": [[0.1, 0.2], [0.1, 0.2], [0.1, 0.3]],
          "accumulate_subsample": [[0.1, 0.2], [0.2, 0.2], [0.2, 0.3]]}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for policy, per_chain in kl.items():
        data = {"source": "two_moons", "n_train": 5, "options": {"noise": 0.1}}
        config = {
            "seed": 0,
            "chains": 2,
            "policy": {"name": policy},
            "model": {"options": {"bandwidth": 0.2}},
        }
        config["data"] = data
        rows = [
            {"generation": t, "status": "ok", "kl_truth": float(np.mean(v))} for t, v in enumerate(per_chain)
        ]
        states = [{"points": torch.randn(2, 5, 2, generator=g, dtype=torch.float64)} for _ in per_chain]
        drawn = [torch.randn(2, 5, 2, generator=g) for _ in per_chain]
        metrics = {"kl_truth": per_chain}
        write_run(
            runs / "gerstgrasser_kde" / policy, config, rows, states, samples=drawn, chain_metrics=metrics
        )
    md = (run_main(analysis("gerstgrasser"), tmp_path) / "gerstgrasser.md").read_text()
    th = gaussian_expected("replace", 10, np.arange(1, 4), d=1, ddof=0)["var_ratio"][-1]
    assert f"| 2 | 10 | 3 | replace | {cell(variances, '.4g', '.2g')} | {th:.4g} |" in md
    drift = [2 * m**2 / 2 for m in (0.0, 0.1, 0.2)]  # ||mu - 0||^2 / tr Sigma_0 with d = 2
    no_closed_form = f"| {cell(variances, '.4g', '.2g')} |  |  | {cell(drift, '.4g', '.2g')} |  |  |"
    assert f"| accumulate_subsample {no_closed_form}" in md
    assert f"| replace | 0.150 | {cell([0.4, 0.5], '.3f', '.3f')} |" in md
    assert (tmp_path / "out" / "gerstgrasser_kde.png").exists()


def test_golden_ratio(tmp_path, capsys):
    errors = {
        0.3: [0.1, 0.2, 0.3],
        0.6: [0.05, 0.1, 0.2],
    }  # per chain: mu_t = (a, 0), so ||mu_t - 0||^2 = a^2
    for w, a in errors.items():
        config = {"seed": 0, "chains": 3, "data": {"options": {"dim": 2, "mean": 0.0, "std": 1.0}},
                  "policy": {"n_real": 100, "n_syn": 100, "weight_real": w}}  # fmt: skip
        mean = torch.tensor([[x, 0.0] for x in a], dtype=torch.float64)
        state = {"mean": mean, "cov": torch.eye(2, dtype=torch.float64).expand(3, 2, 2).contiguous()}
        write_run(tmp_path / "runs" / "golden_ratio" / f"policy.weight_real={w}", config, states=[state] * 33)
    out = run_main(analysis("golden_ratio"), tmp_path)
    md = (out / "results.md").read_text()
    assert "3 chains, generations 31..32 averaged." in md
    for w, a in errors.items():
        m, h, _ = student_t_interval([x**2 for x in a])
        exact = 2 * golden_ratio_stationary(w, 100, 100, 1.0)[0]
        assert f"| {w:g} | {m:.5f} | ± {h:.5f} | {exact:.5f} |" in md
    assert [r["w"] for r in json.loads((out / "results.json").read_text())] == [0.3, 0.6]
    assert capsys.readouterr().out.strip() == md.strip()  # the table is also printed


def test_bertrand(tmp_path):
    floor = {"kl_truth": 0.1, "frechet": 0.2}
    # lambda = 0 sits at the floor; above it, the excess contracts (lambda = 0.5: at 0.5 in seed 0, 0.6 in
    # seed 1) or grows (replace: 1.1) geometrically from 100 and 10 times the floor
    for seed, rho in ((0, 0.5), (1, 0.6)):
        regimes = (({"name": "mix", "lam": 0.0}, 0, 1), ({"name": "mix", "lam": 0.5}, 100, rho),
                   ({"name": "replace"}, 10, 1.1))  # fmt: skip
        for policy, start, rate in regimes:
            errors = [{m: f + start * f * rate**t for m, f in floor.items()} for t in range(5)]
            rows = [{"generation": t, "status": "ok", **e} for t, e in enumerate(errors)]
            name = f"policy={policy['name']}{policy.get('lam', '')},seed={seed}"
            write_run(tmp_path / "runs" / "bertrand" / name, {"seed": seed, "policy": policy}, rows)
    md = (run_main(analysis("bertrand"), tmp_path) / "bertrand.md").read_text()
    rate = t_interval([0.5, 0.6])
    measured = f"{rate['mean']:.3f} ± {rate['half']:.3f}"
    assert f"| λ = 0.5 | fails (0.50) | — | 0.333 | {measured} | {measured} |" in md
    assert "| λ = 0 | holds (0.00) | 0.000 | 0.000 | — (floor after 1 generation) |" in md
    assert (
        "| fully synthetic | no (fully synthetic) | — | — (collapses) | 1.100 ± 0.000 | 1.100 ± 0.000 |" in md
    )


def test_alemohammad(tmp_path):
    runs = tmp_path / "runs"
    for s in (1.0, 0.5):
        config = {"seed": 0, "chains": 3, "sample": {"temperature": s}, "model": {"options": {"ddof": 1}},
                  "data": {"n_train": 10, "options": {"mean": 0.0, "std": 1.0}}}  # fmt: skip
        rows = [{"generation": t, "status": "ok", "precision": 0.9, "recall": s * 0.8} for t in range(10)]
        write_run(runs / "alemohammad_bias" / f"s={s}", config, rows,
                  gaussian_states([0.0, 0.1, -0.1], [s, 2 * s, 3 * s], 2, 10))  # fmt: skip
    modes = torch.tensor([[x, y] for x in (-4.0, -2.0, 0.0, 2.0, 4.0) for y in (-4.0, -2.0, 0.0, 2.0, 4.0)])
    fresh = {"name": "fresh", "n_real": 250, "n_syn": 250}
    loops = {"alemohammad_gmm/policy=replace": ({"name": "replace"}, 5, "fitted"),  # samples on 5 modes
             "alemohammad_fresh/start=bad": (fresh, 25, "bad"),
             "alemohammad_fresh/start=fitted": (fresh, 25, "fitted")}  # fmt: skip
    kl = {"bad": [[4.0, 5.0], [1.0, 1.2], [0.9, 1.1]], "fitted": [[0.5, 0.6], [0.4, 0.5], [0.3, 0.4]]}
    for name, (policy, kept, start) in loops.items():
        config = {"seed": 0, "chains": 2, "policy": policy, "init": {"checkpoint": f"inits/{start}.pt"},
                  "data": {"options": {"dim": 2, "components": 25, "layout": "grid"}}}  # fmt: skip
        x = modes[:kept].repeat(50 // kept, 1).expand(2, -1, -1).contiguous()  # every sample on a kept mode
        rows = [{"generation": t, "status": "ok", "precision": 0.95, "recall": kept / 25} for t in range(3)]
        write_run(runs / name, config, rows, [{"w": torch.zeros(1)}] * 3, samples=[x] * 3,
                  chain_metrics={"kl_truth": kl[start]})  # fmt: skip
    md = (run_main(analysis("alemohammad"), tmp_path) / "alemohammad.md").read_text()
    th = gaussian_expected("replace", 10, np.arange(1, 11), d=2, ddof=1, temperature=0.5, tempered_real=False)
    assert f"| 0.5 | 10 | {cell([0.5, 1.0, 1.5], '.4g', '.2g')} | {th['var_ratio'][9]:.4g} |" in md
    assert "| fully synthetic (replace) | 5.0 | 5.0 | 5.0 ± 0.0 | 0.55 | 0.35 | 1.000 | 0.950 | 0.200 |" in md
    assert "| fresh data (250 real + 250 syn.), bad start | 25.0 | 25.0 | 25.0 ± 0.0 | 4.5 |" in md
    settled = [0.9, 1.1]  # per chain: the mean over the last third (one generation of three)
    assert f"| fresh data (250 real + 250 syn.), bad start | 4.5 | {cell(settled, '.4f', '.4f')} |" in md
    assert "Difference of the settled levels: +0.6500 ±" in md  # bad start 1.0, fitted 0.35


def contamination_run(path: Path) -> Path:
    """A contamination grid: substitute and control at alpha 0.5 and 1 (3 seeds), and a loop's generations."""
    rng = np.random.default_rng(0)
    rows = [{"cell": 0, "status": "ok", "kind": "reference", "mode": "substitute", "ratio": 0.0, "seed": 0,
             "acc_clean": 0.95}]  # fmt: skip
    for s in range(3):
        base = {"status": "ok", "kind": "contaminated", "seed": s}
        rows.append({**base, "mode": "substitute", "ratio": 0.0, "acc_clean": 0.9 + 0.01 * s, "gen_seed": s,
                     "gen_ref_acc": 0.8 + 0.01 * s, "biasamp": 0.1})  # fmt: skip
        for a in (0.5, 1.0):
            for mode, drop in (("substitute", 0.1 * a), ("control", 0.0)):
                acc = float(0.9 - drop + 0.01 * rng.normal())
                rows.append({**base, "mode": mode, "ratio": a, "acc_clean": acc})
            for t in (0, 1):
                acc = 0.8 - 0.1 * t + 0.01 * s
                rows.append(
                    {
                        **base,
                        "mode": "generations",
                        "ratio": a,
                        "gen_t": t,
                        "acc_clean": acc,
                        "biasamp": 0.1 * t,
                    }
                )
    for i, r in enumerate(rows):
        r["cell"] = i
    return write_run(path, {"task": "contaminate", "name": "grid", "seeds": [0, 1, 2]}, rows)


def test_contamination(tmp_path, capsys):
    module = analysis("contamination")
    run = contamination_run(tmp_path / "runs" / "grid" / "base")
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    module.main(["substitute", str(run)])
    out = capsys.readouterr().out
    assert (
        "| alpha | substitute (generated) | control (held-out real) | substitute - control, paired |" in out
    )
    acc = {(r["mode"], r["ratio"], r["seed"]): r["acc_clean"] for r in rows if r["kind"] == "contaminated"}
    gap = [acc["substitute", 1.0, s] - acc["control", 1.0, s] for s in range(3)]
    assert f"| 1 | {cell([acc['substitute', 1.0, s] for s in range(3)], '.4f', '.4f')} |" in out
    assert out.count(cell(gap, ".4f", ".4f")) == 1
    drop = [0.95 - (0.8 + 0.01 * s) for s in range(3)]
    assert "on the generated pools of 3 generator(s)" in out and f"drop {cell(drop, '.4f', '.4f')})" in out
    module.main(["robustness", str(run)])
    assert "no effective-robustness fit (fewer than 6 real-only baselines)" in capsys.readouterr().out
    module.main(["bias", str(run)])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("| 1 | 1 | "))
    assert line.startswith(
        f"| 1 | 1 | {cell([0.7, 0.71, 0.72], '.4f', '.4f')} | - |"
    )  # worst_group_acc: no value
    module.main(["figures", "grid", str(run), "--out", str(tmp_path / "figures")])
    copied = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert copied and all(p.startswith("contamination_grid_") for p in copied)
    assert sorted(capsys.readouterr().out.splitlines()) == [str(tmp_path / "figures" / p) for p in copied]
    with pytest.raises(SystemExit) as e:
        module.main(["frobnicate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'frobnicate'" in err


def test_mitigations(tmp_path):
    """Each arm's mean over the last 4 generations over replace's of the same seed: the geometric mean over
    seeds with its Student-t interval on the log, computed here apart from the analysis."""
    kl = {"real_only": [0.10, 0.12], "replace": [0.20, 0.30], "neon": [0.18, 0.33]}  # per seed, constant
    configs = {"real_only": {"policy": {"name": "mix", "lam": 0.0}},
               "replace": {"policy": {"name": "replace"}},
               "neon": {"policy": {"name": "replace"}, "mitigation": {"neon": {"w": 0.5}}}}  # fmt: skip
    for arm, values in kl.items():
        for seed, v in enumerate(values):
            rows = [{"generation": t, "kl_truth": v if t >= 8 else 9.0} for t in range(13)]
            config = {**configs[arm], "seed": seed, "model": {"family": "flow"}}
            write_run(tmp_path / "runs" / "mitigations_2d" / f"{arm},seed={seed}", config, rows)
    text = (run_main(analysis("mitigations"), tmp_path) / "mitigations.md").read_text()
    logs = [math.log(0.18 / 0.20), math.log(0.33 / 0.30)]
    m, h, _ = student_t_interval(logs)
    want = f"{math.exp(m):.3f} [{math.exp(m - h):.3f}, {math.exp(m + h):.3f}]"
    neon = next(line for line in text.splitlines() if line.startswith("| replace + Neon w=0.5"))
    assert want in neon, (want, neon)
    floor = [math.log(0.20 / 0.10), math.log(0.30 / 0.12)]
    m, h, _ = student_t_interval(floor)
    replace = next(line for line in text.splitlines() if line.startswith("| replace (flow)"))
    assert f"{math.exp(m):.3f} [{math.exp(m - h):.3f}, {math.exp(m + h):.3f}]" in replace
