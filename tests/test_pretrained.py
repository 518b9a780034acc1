"""Starting from a diffusers checkpoint (init.pretrained) and exporting generations as diffusers pipelines.

Everything is offline: a tiny UNet2DModel is written with save_pretrained, the way public checkpoints
such as google/ddpm-cifar10-32 are distributed (a pipeline directory with unet/ and scheduler/).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from simulator.cli import run_config
from simulator.config import ConfigError
from simulator.models import diffusers_io
from simulator.models.diffusion import DiffusionFamily
from simulator.rundir import RunError
from simulator.seeding import derive_seed
from simulator.weights import load_model
from tests.conftest import compose_config

README = Path(__file__).resolve().parents[1] / "docs" / "images.md"  # the page with the sampler block
T = 40  # the checkpoint's own schedule: differs from the family's default (1000) on purpose

NO_METRICS = ("data=digits", "eval.metrics=[]", "eval.stability_metric=null")  # the pretrained checks alone


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """A 1-channel 8x8 UNet with attention in its second level, as google/ddpm-cifar10-32 has at 16x16."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=None)  # fmt: skip


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "ddpm-tiny"
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(out)
    return out


def family(directory: Path | str, **kw) -> DiffusionFamily:
    return DiffusionFamily(chains=1, event_shape=(1, 8, 8), pretrained=str(directory), sample_steps=5,
                           likelihood_timesteps=4, **kw)  # fmt: skip


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_dir_gives_architecture_weights_and_schedule(pipeline_dir: Path) -> None:
    # the config's architecture options are ignored: the directory decides
    fam = family(pipeline_dir, block_out_channels=(32, 64), train_timesteps=1000, beta_schedule="linear")
    assert same_weights(fam.unet, tiny_unet()) and same_weights(fam.ema, tiny_unet())
    assert fam.block_out_channels == (8, 16) and fam.attention and fam.train_timesteps == T
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(fam.noise_scheduler.betas, ref.betas)
    assert torch.equal(fam.sample_scheduler.alphas_cumprod, ref.alphas_cumprod)
    with torch.no_grad():  # reset re-reads the checkpoint: "from scratch" is the pretrained start
        next(fam.unet.parameters()).add_(1.0)
    fam.reset(torch.Generator().manual_seed(1))
    assert same_weights(fam.unet, tiny_unet())
    x = fam.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 3, 1, 8, 8) and x.dtype == torch.uint8
    assert torch.isfinite(fam.log_prob(x)).all()


def test_bare_unet_dir_and_legacy_attention_names(pipeline_dir: Path, tmp_path: Path) -> None:
    fam = family(pipeline_dir / "unet", train_timesteps=20)  # no scheduler: the schedule is the config's
    assert same_weights(fam.unet, tiny_unet()) and fam.train_timesteps == 20
    # a .bin from diffusers < 0.13 names attention parameters query/key/value/proj_attn
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((pipeline_dir / "unet" / "config.json").read_text())
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in tiny_unet().state_dict().items():
        for new, name in old.items():
            k = k.replace(f".{new}.", f".{name}.")
        state[k] = v
    assert any(".proj_attn." in k for k in state)
    torch.save(state, legacy / "diffusion_pytorch_model.bin")
    assert same_weights(family(legacy).unet, tiny_unet())


def test_weights_hash_names_the_checkpoint(pipeline_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    DDPMPipeline(unet=tiny_unet(1), scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(other)
    h = diffusers_io.weights_sha256(diffusers_io.read(pipeline_dir))
    assert len(h) == 64 and h == diffusers_io.weights_sha256(diffusers_io.read(pipeline_dir / "unet"))
    assert h != diffusers_io.weights_sha256(diffusers_io.read(other))


def test_bad_directories_are_one_line_errors(pipeline_dir: Path, tmp_path: Path) -> None:
    cases = {"missing": "directory not found", "empty": "no UNet config", "vpred": "prediction_type",
             "noweights": "no UNet weights", "pickle": "cannot read"}  # fmt: skip
    (tmp_path / "empty").mkdir()
    vpred = tmp_path / "vpred"
    vsched = DDPMScheduler(prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(), scheduler=vsched).save_pretrained(vpred)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((pipeline_dir / "unet" / "config.json").read_text())
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text((pipeline_dir / "unet" / "config.json").read_text())
    torch.save({"weights": object()}, pickle / "diffusion_pytorch_model.bin")  # not loadable weights_only
    for name, match in cases.items():
        with pytest.raises(ValueError, match=f"^init.pretrained: .*{match}") as e:
            diffusers_io.load_unet(diffusers_io.read(tmp_path / name))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^init.pretrained: .*\(1, 8, 8\).*\(1, 16, 16\)"):
        DiffusionFamily(chains=1, event_shape=(1, 16, 16), pretrained=str(pipeline_dir))
    # through the config checks: before any work, naming the field
    for bad, match in [(tmp_path / "missing", "directory not found"), (vpred, "prediction_type")]:
        with pytest.raises(ConfigError, match="^init.pretrained: " + match):
            run_config(compose_config(*NO_METRICS, "model=diffusion_tiny", f"init.pretrained={bad}"),
                       tmp_path / "run")  # fmt: skip
    both = (*NO_METRICS, "model=diffusion_tiny", f"init.pretrained={pipeline_dir}",
            f"init.checkpoint={pipeline_dir / 'model_index.json'}")  # fmt: skip
    with pytest.raises(ConfigError, match="^init.pretrained: give either init.pretrained or init.checkpoint"):
        run_config(compose_config(*both), tmp_path / "run")
    with pytest.raises(ConfigError, match="^init.pretrained: .*family=gaussian"):
        run_config(compose_config(*NO_METRICS, "model=gaussian", f"init.pretrained={pipeline_dir}"),
                   tmp_path / "run2")  # fmt: skip


def loop_config(pipeline: Path, *extra: str):
    return compose_config(
        "data=digits", "data.n_train=48", "data.n_test=16", "model=diffusion_tiny", "policy=mix",
        "generations=1", "train.steps=2", "eval.metrics=[]", "eval.stability_metric=null", "durable=false",
        "eval.figures=false",
        "model.options.sample_steps=4", "model.options.batch_size=16", "model.options.export_pipeline=true",
        f"init.pretrained={pipeline}", *extra,
    )  # fmt: skip


def test_two_generations_from_a_checkpoint_export_pipelines(
    pipeline_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(pipeline_dir, ckpt)
    with caplog.at_level(logging.INFO, logger="simulator"):
        summary = run_config(loop_config(ckpt), run)
    assert summary["status"] == "complete"
    assert (
        "model.options attention, block_out_channels, layers_per_block, num_classes are ignored"
        in caplog.text
    )
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert rows[0]["train"] == {"loaded": str(ckpt)} and rows[1]["n_train"] == 48 + 24
    recorded = (run / "config.yaml").read_text()
    assert diffusers_io.weights_sha256(diffusers_io.read(ckpt)) in recorded
    # generation 0 is the checkpoint itself; generation 1 was fine-tuned from it
    assert same_weights(DDPMPipeline.from_pretrained(run / "gen_000" / "pipeline").unet, tiny_unet())
    for cls in (DDPMPipeline, DDIMPipeline):
        pipe = cls.from_pretrained(run / "gen_001" / "pipeline")
        state = load_model(run / "gen_001")
        ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
        assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())  # EMA weights
        assert pipe.scheduler.config.num_train_timesteps == T
        assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.clip_sample
        images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images  # fmt: skip
        assert images.shape == (2, 8, 8, 1) and ((images >= 0) & (images <= 1)).all()
    # the exported files are checksummed with the generation, so a damaged one is caught on resume
    state = json.loads((run / "state.json").read_text())
    assert {"gen_001/pipeline/unet/config.json", "gen_001/pipeline/sampling.json"} <= set(state["files"])
    sampling = json.loads((run / "gen_001" / "pipeline" / "sampling.json").read_text())
    assert sampling["num_inference_steps"] == 4 and sampling["timestep_spacing"] == "trailing"
    # other weights under the same directory name are refused on resume (their hash differs)
    DDPMPipeline(unet=tiny_unet(1), scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(ckpt)
    with pytest.raises(RunError, match="pretrained_sha256"):
        run_config(loop_config(ckpt, "generations=2"), run)


def readme_sampler() -> dict:
    """docs/images.md's sampler for exported pipelines (the block after its marker), executed."""
    text = README.read_text()
    block = re.search(r"<!-- exported-pipeline-sampler.*?-->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/images.md lost its exported-pipeline sampler block"
    namespace: dict = {}
    exec(compile(block.group(1), "docs/images.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("spacing", ["trailing", "quadratic"])
def test_exported_pipeline_reproduces_the_run(sampler: str, spacing: str, tmp_path: Path) -> None:
    """Fed the run's noise (per-sample generators, 64 rows: the CPU's network batch), DDIMPipeline with
    sampling.json's settings (trailing) and the sampler of docs/images.md (either spacing) give the pixels."""
    fam = DiffusionFamily(chains=1, event_shape=(1, 8, 8), block_out_channels=(4, 8), layers_per_block=1,
                          train_timesteps=T, sample_steps=5, sampler=sampler, timestep_spacing=spacing,
                          export_pipeline=True)  # fmt: skip
    ours = fam.sample(64, generator=torch.Generator().manual_seed(3))[0]
    path = fam.export(tmp_path)
    settings = json.loads((path / "sampling.json").read_text())
    assert settings["timesteps"] == fam.sample_timesteps.tolist() and settings["timestep_spacing"] == spacing
    assert settings["eta"] == (1.0 if sampler == "ddpm" else 0.0) and settings["noise"] == "per_sample"
    gens = lambda: [torch.Generator().manual_seed(derive_seed(3, i)) for i in range(64)]  # noqa: E731
    pipe = DDIMPipeline.from_pretrained(path)
    call = dict(batch_size=64, num_inference_steps=settings["num_inference_steps"], eta=settings["eta"],
                use_clipped_model_output=settings["use_clipped_model_output"], output_type="pt")  # fmt: skip
    pixels = lambda images: (images * 255).round().to(torch.uint8)  # noqa: E731
    run_pipeline = pixels(pipe(generator=gens(), **call).images)
    assert torch.equal(run_pipeline, ours) == (spacing == "trailing")  # DDIMScheduler strides evenly
    leading = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    leading = DDIMPipeline(unet=pipe.unet, scheduler=leading)
    same = (pixels(leading(generator=gens(), **call).images) == ours).float().mean()
    assert same < 0.5  # diffusers' default spacing, "leading": other timesteps, other images
    g = gens()  # x_T from each row's generator, then (eta > 0) each step's noise from the same stream
    x = torch.stack([torch.randn(1, 8, 8, generator=r) for r in g])
    noise = lambda x: torch.stack([torch.randn(x.shape[1:], generator=r) for r in g])  # noqa: E731
    assert torch.equal(readme_sampler()["sample"](str(path), x, noise), ours)


# -- every field of a diffusers directory checked before any work (issue 17) -------------------------------


def edited(pipeline_dir: Path, tmp_path: Path, part: str, **values) -> Path:
    """A copy of the pipeline with values written into one of its JSON configs."""
    out = tmp_path / "edited"
    shutil.copytree(pipeline_dir, out)
    path = out / part
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return out


UNET_JSON, SCHEDULER_JSON = "unet/config.json", "scheduler/scheduler_config.json"


@pytest.mark.parametrize(
    "part,values,line",
    [
        (
            SCHEDULER_JSON,
            {"trained_betas": [0.01] * 3},
            f"trained_betas: must hold one beta per timestep (num_train_timesteps {T}), got 3",
        ),
        (
            SCHEDULER_JSON,
            {"trained_betas": [1.5] * T},
            "trained_betas: must be a list of finite numbers in (0, 1) or null",
        ),
        (SCHEDULER_JSON, {"beta_end": 0}, "beta_end: must be a finite number in (0, 1), got 0"),
        (SCHEDULER_JSON, {"num_train_timesteps": "many"}, "num_train_timesteps: must be an integer in [2, "),
        (
            UNET_JSON,
            {"sample_size": "big"},
            "sample_size: must be an integer >= 1 or a list of integers >= 1 or null, got 'big'",
        ),
        (UNET_JSON, {"in_channels": True}, "in_channels: must be an integer >= 1, got True"),
        (UNET_JSON, {"up_block_types": ["UpBlock2D"]}, "up_block_types: must name one block per width"),
        (UNET_JSON, {"down_block_types": ["FooBlock2D", "DownBlock2D"]}, "cannot build a UNet2DModel from"),
    ],
)
def test_each_config_field_is_one_line_naming_it(pipeline_dir, tmp_path, part, values, line) -> None:
    with pytest.raises(ValueError) as err:
        diffusers_io.read(edited(pipeline_dir, tmp_path, part, **values))
    assert str(err.value).startswith(f"init.pretrained: {line}") and "\n" not in str(err.value)


def test_the_unet_is_sized_against_memory_without_building_it(pipeline_dir, tmp_path, monkeypatch) -> None:
    """read() counts the UNet's parameters on the meta device: a config of 2.7e13 parameters is refused
    at once, and one that fits refuses on a machine with too little memory, naming init.pretrained."""
    from simulator import machine

    wide = edited(pipeline_dir, tmp_path, UNET_JSON, block_out_channels=[200000, 400000])
    line = r"^init.pretrained: block_out_channels \[200000, 400000\] of .* make a UNet of 27,160,037,800,001"
    with pytest.raises(ValueError, match=line + " parameters, which with its weights read needs"):
        diffusers_io.read(wide)
    monkeypatch.setattr(machine, "available_memory", lambda: 1000)
    line = r"^init.pretrained: block_out_channels \[8, 16\] of .* more than the 1000 bytes this machine has"
    with pytest.raises(ValueError, match=line + " available$"):
        diffusers_io.read(pipeline_dir)


def test_weights_that_do_not_fit_the_config_are_one_line(pipeline_dir, tmp_path) -> None:
    """Same names, other shapes: the header is compared with the config before any work, and a file
    replaced between that check and the load is still one line, not load_state_dict's list."""
    other = tmp_path / "other"
    wider = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=None,
    )
    wider.save_pretrained(other)
    mixed = tmp_path / "mixed"
    shutil.copytree(pipeline_dir, mixed)
    weights = "diffusion_pytorch_model.safetensors"
    pre = diffusers_io.read(mixed)  # the checked directory ...
    shutil.copy(other / weights, mixed / "unet" / weights)  # ... then its weights replaced
    with pytest.raises(ValueError, match=r"^init.pretrained: .* does not match .*config.json \(block_out_"
                       r"channels, .*\): 100 parameters differ in shape, e.g. "):  # fmt: skip
        diffusers_io.read(mixed)
    with pytest.raises(ValueError, match=r"^init.pretrained: .* does not fit its config: ") as err:
        diffusers_io.load_unet(pre)
    assert "\n" not in str(err.value)
