"""Shared test helpers: compose the real hydra config with overrides, as `simulate` would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from simulator.cli import CONFIG_DIR

# The models in the tests are tiny: one thread is faster, and immune to other processes' load.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"


def compose_config(*overrides: str) -> DictConfig:
    """The composed run config for these overrides (single run: the default sweep is switched off)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=single", "progress=false", *overrides])


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent (looked for {SHARED}); it holds the CIFAR-10 test data")
    return SHARED
