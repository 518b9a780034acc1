"""simulator/entry.py, the plumbing `simulate` and `simulate-contaminate` share: one console wrapper, one
sweep callback, one set of user errors."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from simulator import cli, entry
from simulator.contamination import cli as contaminate_cli
from simulator.contamination.mixing import ContaminationError
from simulator.policies import PolicyError


def test_both_entry_points_are_built_from_the_same_plumbing():
    assert set(entry.USER_ERRORS) < set(cli.USER_ERRORS) and PolicyError in cli.USER_ERRORS
    assert set(entry.USER_ERRORS) < set(contaminate_cli.USER_ERRORS)
    assert ContaminationError in contaminate_cli.USER_ERRORS
    assert issubclass(cli.SweepReport, entry.SweepCallback)
    assert issubclass(contaminate_cli.SweepReport, entry.SweepCallback)
    assert cli.CONFIG_DIR == contaminate_cli.CONFIG_DIR == entry.CONFIG_DIR


@pytest.mark.parametrize(("raised", "code", "line"), [
    (KeyboardInterrupt, 130, "interrupted: what was committed is kept; run the same command again to resume"),
    (entry.Terminated, 143, "terminated (SIGTERM): what was committed is kept"),
])  # fmt: skip
def test_the_console_ends_an_interrupted_command_in_one_line(monkeypatch, capsys, raised, code, line):
    def hydra_main() -> None:
        raise raised

    def build(cfg, cache):
        raise AssertionError("--help runs no preflight")

    monkeypatch.setattr(sys, "argv", ["simulate-contaminate", "--help"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        entry.console(hydra_main, "contaminate", build, contaminate_cli.USER_ERRORS)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == code and len(err) == 1 and err[0].startswith(line)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is given back


def test_the_preflight_runs_the_entry_points_own_command_line_check_first(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        contaminate_cli.preflight(["contaminate/debug=tiny", "modes.replace=[0.5]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == ["error: modes.replace: renamed to modes.substitute"]


def test_the_sweep_callback_reports_over_the_runs_a_sweep_holds(tmp_path, capsys):
    seen = []

    class Report(entry.SweepCallback):
        def report(self, config, sweep, runs):
            seen.append((sweep, runs))
            return f"report of {len(runs)}"

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    Report().on_multirun_end(config)
    assert seen == [] and capsys.readouterr().out == ""  # no run: no report
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("{}\n")
    (tmp_path / "figures").mkdir()  # not a run
    Report().on_multirun_end(config)
    assert seen == [(Path(tmp_path), [tmp_path / "a", tmp_path / "b"])]
    assert capsys.readouterr().out == "report of 2\n"
