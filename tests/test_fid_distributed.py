"""Sharded image metrics (torch.distributed, gloo on CPU): 2 processes give the 1-process FID, KID,
precision/recall (sample and reference features split by rank and gathered) and bits/dim (log_prob of
each rank's test images, totals summed).

The ranks are forked from the test process, which has already imported torch-fidelity (torchvision):
spawned ranks spend most of their time importing it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simulator.data.images import make_image
from simulator.metrics import features as fx
from simulator.metrics import fid as fidm
from simulator.metrics.registry import MetricContext, get

# 101 samples per chain and 203 reference images: odd counts, so the two ranks' shards differ in size.
N_FAKE, N_REAL, N_BPD = 101, 203, 37
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
OPTIONS = dict(extractor="tiny", tiny_steps=30, kid=True, prc=True, kid_subsets=10, kid_subset_size=50,
               n_real=N_REAL, batch_size=16, n_bpd=N_BPD)  # fmt: skip


class PixelCategorical:
    """A toy image model with an exact likelihood: independent pixels, each with its own 256-way law."""

    chains, exact_likelihood = 2, True

    def __init__(self) -> None:
        logits = torch.randn(
            self.chains, 64, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
        self.table = torch.log_softmax(logits, -1)  # (C, pixels, values)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(C, n) log-likelihood of uint8 images (n, 1, 8, 8)."""
        idx = x.reshape(len(x), 64).long()
        return self.table[:, torch.arange(64), idx].sum(-1)


def metrics(cache: str) -> dict[str, torch.Tensor]:
    """fid (two chains) and bpd of a toy two-chain model, on 8x8 digits, with a fresh cache."""
    torch.set_num_threads(1)
    data = make_image("digits").load(generator=torch.Generator().manual_seed(0))
    samples = torch.stack([data.train[0, :N_FAKE], torch.roll(data.train[0, -N_FAKE:], 1, dims=-1)])
    model = PixelCategorical()
    fidm.clear_memory_cache()
    before = fidm.reference_extractions()
    options = dict(OPTIONS, cache_dir=cache)
    ctx = MetricContext(model=model, samples=samples, data=data, generation=1,
                        generator=torch.Generator().manual_seed(7), options=options)  # fmt: skip
    with torch.no_grad():
        out = get("fid")(ctx) | get("bpd")(ctx)
    (ref,) = fidm._MEMO.values()
    (net,) = fx._LOADED.values()
    out["reference_features"] = ref.features
    out["sample_features"] = torch.stack([fx.sharded_features(net, s, 16) for s in samples])
    out["reference_extractions"] = torch.tensor(fidm.reference_extractions() - before)
    return out


def _worker(rank: int, world_size: int, init_file: str, cache: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(metrics(cache), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    single = metrics(str(tmp_path / "cache1"))
    out = str(tmp_path / "rank")
    args = (2, str(tmp_path / "init"), str(tmp_path / "cache2"), out)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert len(list((tmp_path / "cache2" / "fid_reference").glob("*.pt"))) == 1
    ref, fake = single["reference_features"].double(), single["sample_features"].double()
    for double in ranks:
        assert double.keys() == single.keys()
        assert int(double["reference_extractions"]) == 1  # extracted once, together
        # Features agree to float32 rounding: a rank's batches hold other images, and CPU convolution
        # kernels may sum in another order for another batch (measured here: bit-equal for the reference).
        torch.testing.assert_close(double["reference_features"], single["reference_features"])
        torch.testing.assert_close(double["sample_features"], single["sample_features"])
        for c in range(2):
            # So FID and KID agree to float32 rounding of their terms, with independent rounding errors over
            # F = 64 features adding like sqrt(F) (as tests/test_fid.py bounds them). Measured: 2e-6, 8e-7.
            mu, mu_r = fake[c].mean(0), ref.mean(0)
            scale = float(mu.square().sum() + mu_r.square().sum() + fake[c].var(0).sum() + ref.var(0).sum())
            assert abs(float(double["fid"][c] - single["fid"][c])) <= 8 * EPS32 * scale
            k_scale = float(((fake[c] @ ref.T / 64 + 1) ** 3).abs().mean())
            for key in ("kid_mean", "kid_std"):
                assert abs(float(double[key][c] - single[key][c])) <= 8 * EPS32 * k_scale
            # A k-NN ball's edge may flip with rounding: at most one sample or real image (measured: equal).
            assert abs(float(double["precision"][c] - single["precision"][c])) <= 1 / N_FAKE + 1e-7
            assert abs(float(double["recall"][c] - single["recall"][c])) <= 1 / N_REAL + 1e-7
        # bits/dim: exact per-image log-likelihoods, summed in another order over 37 images in float64.
        torch.testing.assert_close(double["bpd"], single["bpd"], rtol=64 * EPS64, atol=0)
