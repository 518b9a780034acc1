"""The fine-tuning protocol and the real-only control (lambda = 0) on digits with model=glow.

policy=real_only retrains on the real training set every generation, so its generations are exactly
G_t = fit(G_{t-1}, R, steps, seeding.generator(seed, t, "fit")) with G_0 = fit(reset(init), R, steps_gen0)
as the loop runs them; this script runs those fits directly (no sampling) and reports the held-out
bits/dim (the loop's `bpd` metric: fixed dequantization field, all test images) for three protocols:

- fresh:          a new Adam at the full learning rate every generation (the old protocol);
- carry:          G_{t-1}'s Adam state carried into generation t (train.carry_optimizer=true);
- fresh+warmup50: a new Adam with 50 steps of linear learning-rate warm-up (train.warmup=50).

Two measurements per seed: `transient` -- bits/dim after k steps of generation 1 from an 800-step G_0;
`generations` -- bits/dim of generations 1..3 (150 steps each) from a 3000-step G_0.
Usage: python benchmarks/finetune_protocol.py [seeds, default 0,1]   (about 10 minutes a seed, 1 CPU core)
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import command_line, config, write
from simulator import registry, seeding

PROTOCOLS = {"fresh": (False, 0), "carry": (True, 0), "fresh+warmup50": (False, 50)}
KS, STEPS, GENERATIONS = (1, 5, 20, 150), 150, 3


def measure(seed: int) -> dict:
    cfg = config("data=digits", "model=glow", "eval=digits", "policy=real_only", f"seed={seed}")
    data = registry.make_data(cfg)
    make = registry.make_model_factory(cfg, data.event_shape, "cpu")
    dims = math.prod(data.event_shape)

    def bpd(model) -> float:
        return float(-model.log_prob(data.test).mean() / (dims * math.log(2)))

    def g0(steps: int):
        model = make()
        model.reset(seeding.generator(seed, 0, "init"))
        model.fit(data.train, steps=steps, generator=seeding.generator(seed, 0, "fit"))
        return model.state_dict(), model.optimizer_state, bpd(model)

    out: dict = {"seed": seed}
    state, opt, out["transient_G0"] = g0(800)
    for name, (carry, warm) in PROTOCOLS.items():
        row = {}
        for k in KS:
            model = make()
            model.load_state_dict(state)
            model.fit(data.train, steps=k, generator=seeding.generator(seed, 1, "fit"),
                      optimizer_state=opt if carry else None, warmup=warm)  # fmt: skip
            row[k] = bpd(model)
        out[f"transient_{name}"] = row
    state, opt, out["generations_G0"] = g0(3000)
    for name, (carry, warm) in PROTOCOLS.items():
        model, o, traj = make(), opt, []
        model.load_state_dict(state)
        for t in range(1, GENERATIONS + 1):
            model.fit(data.train, steps=STEPS, generator=seeding.generator(seed, t, "fit"),
                      optimizer_state=o if carry else None, warmup=warm)  # fmt: skip
            o = model.optimizer_state
            traj.append(bpd(model))
        out[f"generations_{name}"] = traj
    print(out, flush=True)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = command_line(__doc__)
    parser.add_argument("seeds", nargs="?", default="0,1", help="comma-separated seeds (default 0,1)")
    seeds = [int(s) for s in parser.parse_args().seeds.split(",")]
    write(f"finetune_protocol_seeds_{'_'.join(map(str, seeds))}", {"runs": [measure(s) for s in seeds]})
