"""Data-parallel training (torch.distributed, gloo on CPU): 2 processes train what 1 process trains.

Every family that trains through simulator.models.training (flow, glow, diffusion, the classifiers) runs in
2 gloo processes and in 1; the 2-process update must be the 1-process update up to float rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simulator import classifiers
from simulator.models.diffusion import DiffusionFamily
from simulator.models.flow import FlowFamily
from simulator.models.glow import GlowFamily
from simulator.models.training import EpochBatches, Objective, TrainOptions, train

STEPS = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n, 1, 8, 8), generator=gen(0), dtype=torch.uint8)


def _family(name: str):
    if name == "flow":
        return FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=8, batch_size=16), torch.randn(
            1, 64, 2, generator=gen(0)
        )
    if name == "glow":
        model = GlowFamily(
            chains=1, event_shape=(1, 8, 8), levels=1, blocks_per_level=2, hidden=8, batch_size=8
        )
        return model, _images(32)
    model = DiffusionFamily(
        chains=1, event_shape=(1, 8, 8), block_out_channels=(4, 8), batch_size=8, ema_decay=0.9
    )
    return model, _images(32)


def train_all() -> dict[str, dict[str, torch.Tensor]]:
    """Start and end weights of a short fit of each family (from scratch: ActNorm initialises too)."""
    torch.set_num_threads(1)
    out = {}
    for name in ("flow", "glow", "diffusion"):
        model, data = _family(name)
        model.reset(gen(1))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        stats = model.fit(data, steps=STEPS, generator=gen(2))
        out[name] = {"start": start, "end": model.state_dict(), "loss": torch.tensor(stats["loss_last"])}
    x, y = _images(32)[0], torch.arange(32) % 3
    net = classifiers.make_classifier("cnn", (1, 8, 8), 3, generator=gen(1), width=4)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    classifiers.train_classifier(net, x, y, steps=STEPS, generator=gen(2), batch_size=8, augment="crop_flip")
    out["classifier"] = {"start": start, "end": {k: v.clone() for k, v in net.state_dict().items()}}
    return out


class Linear(Objective):
    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(5, 3))
        g = gen(0)
        with torch.no_grad():
            self.net.weight.copy_(torch.randn(3, 5, generator=g))
            self.net.bias.copy_(torch.randn(3, generator=g))
        self.x, self.y, self.batches = (
            torch.randn(8, 5, generator=g),
            torch.randn(8, 3, generator=g),
            EpochBatches(8, 8),
        )

    def draw(self, generator):
        return (self.batches.next(generator),)

    def forward(self, idx):
        return torch.nn.functional.mse_loss(self.net(self.x[idx]), self.y[idx])


def linear_step() -> torch.Tensor:
    """One plain SGD step (lr 1) of a mean-squared loss: the averaged gradient of the global batch."""
    obj = Linear()
    before = torch.cat([p.detach().reshape(-1).clone() for p in obj.net.parameters()])
    train(
        obj,
        steps=1,
        generator=gen(0),
        options=TrainOptions(optimizer="sgd", lr=1.0),
        device=torch.device("cpu"),
    )
    after = torch.cat([p.detach().reshape(-1) for p in obj.net.parameters()])
    return before - after  # lr * (gradient + Nesterov momentum term, the same on one step)


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        step = linear_step()
        result = train_all()
        if rank == 0:
            torch.save({"step": step, "families": result}, out)
    finally:
        dist.destroy_process_group()


def relative_update_difference(one: dict, two: dict) -> float:
    """|move_2 - move_1| / |move_1| over the float weights (a whole-update comparison, see below)."""
    keys = [k for k in one["end"] if one["end"][k].is_floating_point() and not k.startswith("ema.")]
    move_1 = torch.cat([(one["end"][k] - one["start"][k]).reshape(-1) for k in keys])
    move_2 = torch.cat([(two["end"][k] - one["start"][k]).reshape(-1) for k in keys])
    assert move_1.norm() > 0, "training must move the weights for the comparison to mean anything"
    return float((move_2 - move_1).norm() / move_1.norm())


@pytest.mark.slow  # two spawned processes importing torch, diffusers and normflows: about a minute
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_gloo_processes_train_what_one_trains(tmp_path):
    single = train_all()
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    # DDP's averaged gradient of the split batch is the whole batch's gradient, up to float rounding
    torch.testing.assert_close(result["step"], linear_step(), rtol=1e-6, atol=1e-7)
    double = result["families"]
    for name in single:
        assert single[name]["start"].keys() == double[name]["end"].keys()
        for k, v in single[name]["start"].items():  # same start on both ranks' reference
            assert torch.equal(v, double[name]["start"][k])
    # Adam divides by sqrt(v): for weights whose gradient is ~0, rounding-level differences in the
    # gradient become lr-sized steps, so the runs agree in their update as a whole, not per weight.
    # Measured |move_2 - move_1| / |move_1| after 6 steps: flow 4.5e-4, glow 1.4e-3, diffusion 1.2e-2,
    # classifier 7.9e-7 (AdamW's 2 x 4 rows vs 8 rows). With ActNorm initialised on each rank's half batch
    # instead of the global batch: flow 0.27, glow 0.18. The limits sit ~5-10x above the measurements
    # and well below the failures; the old hand-written all-reduce measured 0.8% on the diffusion case.
    limits = {"flow": 5e-3, "glow": 1e-2, "diffusion": 0.05, "classifier": 1e-4}
    for name, limit in limits.items():
        assert relative_update_difference(single[name], double[name]) < limit, name
    for name in ("flow", "glow", "diffusion"):  # the logged loss is the global batch's mean
        # measured: relative differences 3e-5 (flow), 8e-4 (glow), 1e-7 (diffusion): the same rounding
        assert float(double[name]["loss"]) == pytest.approx(float(single[name]["loss"]), rel=5e-3)
