"""Experiment (b), step 1: loop runs of a class-conditional DDPM on colorized digits (generations 0..4).

A fully synthetic loop (policy replace) and a mixed one (policy mix, lambda = 1: all real images plus as
many samples of the previous generation, Bertrand et al. 2024), both fine-tuned from the previous
generation, written to runs/colored_loops/<policy>_s<seed>/ (resumable): one loop run per replicate seed
(0, 1, 2), so the classifiers' intervals cover the loop's own variance (generator.replicates); the two
policies of a seed share generation 0 (share_gen0: they differ only from generation 1 on). Until
simulator.data.colored is listed in registry.SOURCE_MODULES the source is added here at runtime; the
data and model blocks below are what a configs/data/colored_digits.yaml and a class-conditional
diffusion model config would hold.

Usage: python experiments/contamination/loop_colored.py [replace] [mix] [--tiny] [--seeds=0,1,2]
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from simulator import registry
from simulator.cli import CONFIG_DIR, run_config

registry.SOURCE_MODULES.setdefault("simulator.data.colored", ("COLORED_SOURCES", "make_colored"))

# The same data block as configs/contaminate/data/colored_digits.yaml: the classifiers see these images.
DATA = {
    "source": "colored_digits",
    "n_train": None,
    "n_test": None,
    "options": {"colors": 2, "strength": 0.8, "imbalance": 4.0},
}
# (32, 64) is the smallest UNet that kept the two colours pure on CPU trials; (16, 32) blended them.
MODEL = {
    "family": "diffusion",
    "options": {
        "block_out_channels": [32, 64],
        "num_classes": 10,
        "batch_size": 64,
        "lr": 1.0e-3,
        "sample_steps": 20,
        "warmup": 100,
    },
}
POLICIES = {"replace": ["policy=replace"], "mix": ["policy=mix", "policy.lam=1.0"]}
STEPS = ["generations=4", "train.steps=300", "train.steps_gen0=2000", "share_gen0=true"]
TINY = ["generations=1", "train.steps=2", "train.steps_gen0=2"]


def main(args: list[str]) -> None:
    tiny = "--tiny" in args
    names = [a for a in args if not a.startswith("--")] or list(POLICIES)
    seeds = next((a.split("=", 1)[1] for a in args if a.startswith("--seeds=")), "0,1,2")
    for name, seed in [(n, int(s)) for s in seeds.split(",") for n in names]:  # seed-major: gen 0 shared
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    "experiment=single",
                    "progress=false",
                    "threads=1",
                    "eval.metrics=[]",
                    "eval.stability_metric=null",
                    "eval.n_samples=null",
                    "eval.figures=false",
                    *(TINY if tiny else STEPS),
                    *POLICIES[name],
                    f"seed={seed}",
                ],
            )
        with open_dict(cfg):
            cfg.data = DATA
            cfg.model = MODEL
        root = "runs/colored_loops_tiny" if tiny else "runs/colored_loops"
        summary = run_config(cfg, f"{root}/{name}_s{seed}")
        print(f"{root}/{name}_s{seed}: {summary}")


if __name__ == "__main__":
    main(sys.argv[1:])
