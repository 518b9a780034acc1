"""CUDA paths: run only where a GPU is present (marked `cuda`; skipped otherwise, as in CI).

The tiny CIFAR-10 loop with bf16 autocast, channels_last and torch.compile end to end, fp16 training with
its gradient scaler, and the device-side draws: what the CPU test suite cannot reach.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from simulator.cli import run_config
from tests.conftest import compose_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)"),
]


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in (path / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_tiny_cifar_loop_with_autocast_channels_last_and_compile(tmp_path, shared_dir, amp):
    cfg = compose_config(
        "experiment=cifar10_bertrand_smoke", "hydra.mode=RUN", f"data.options.root={shared_dir / 'data'}",
        "device=cuda", f"model.options.amp={amp}", "model.options.channels_last=true",
        "model.options.compile=true", f"++eval.options.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    summary = run_config(cfg, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert summary["status"] == "complete" and [r["generation"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert math.isfinite(r["fid"]) and math.isfinite(r["bpd_bound"]) and r["bpd_bound"] > 0
        assert r["status"] == "ok"


def test_cuda_fit_moves_weights_and_checkpoints_resume(tmp_path):
    from simulator.models.base import FitCheckpoint
    from simulator.models.diffusion import DiffusionFamily

    opts = dict(chains=1, event_shape=(3, 8, 8), block_out_channels=(8, 16), batch_size=16, device="cuda",
                amp="bf16", channels_last=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (1, 64, 3, 8, 8), generator=g, dtype=torch.uint8)
    whole = DiffusionFamily(**opts)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    stats = whole.fit(data, steps=6, generator=torch.Generator().manual_seed(1))
    assert math.isfinite(stats["loss_last"])
    moved = sum(float((whole.state_dict()[k].float() - start[k].float()).abs().sum())
                for k in start if k.startswith("unet.") and start[k].is_floating_point())  # fmt: skip
    assert moved > 0
    # a checkpointed fit of the same length finishes and removes its checkpoint file
    ckpt = FitCheckpoint(tmp_path / "fit_state.pt", every_steps=2)
    other = DiffusionFamily(**opts)
    other.fit(data, steps=6, generator=torch.Generator().manual_seed(1), checkpoint=ckpt)
    assert not ckpt.path.exists()


def test_sampling_on_cuda_is_batch_independent():
    from simulator.models.diffusion import DiffusionFamily

    model = DiffusionFamily(chains=1, event_shape=(3, 8, 8), block_out_channels=(8, 16), sample_steps=5,
                            device="cuda")  # fmt: skip
    g = torch.Generator().manual_seed(3)
    full = model.sample(12, generator=g)
    part = model.sample(12, generator=g, indices=[3, 7, 11])
    assert full.dtype == torch.uint8 and full.shape == (1, 12, 3, 8, 8)
    # GPU kernels may pick other algorithms by batch size: rows agree up to an 8-bit rounding step
    assert (full[:, [3, 7, 11]].int() - part.int()).abs().max() <= 1
