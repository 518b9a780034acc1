"""Labelled synthetic images for the contamination paths, and where they come from.

A generator is either
- generation t of a loop run (`kind: run`): a class-conditional family in `run_dir`, or one unconditional
  run per class in `run_dirs` (list position = class); or one loop run per replicate seed in `replicates`
  (list position = position in `seeds`), so that replicates differ in their generator as well. Its images
  are the loop's own saved samples (gen_XXX samples and labels, simulator.samples) when they hold enough of
  every class, else fresh draws from gen_XXX's model file, the family rebuilt from the run's config.yaml
  through registry.make_model_factory;
- or trained on the spot (`kind: train`) on the real training images: one class-conditional model, or one
  unconditional model per class (`per_class: true`), saved under <run>/generator/seed_<g>/ once and reused.
  With `seed: null` every replicate seed g trains its own generator from g; an integer shares one. With
  split.test=per_replicate generator g trains on replicate g's own training partition (`reals`).
- or images made elsewhere (`kind: external`; e.g. Stable Diffusion's): a folder of class subfolders (the
  ImageFolder layout; subfolders named 0..K-1 are those classes, other names are classes in sorted order) or
  a `.npz` holding `images` (n, h, w, c or n, c, h, w; uint8) and `labels`. Images are converted to the
  data's channels and resized to its size; a pool takes a uniform random subset of each class.
A generator replicate is named by its seed g (None: the one shared loop run). A pool holds exactly `need[y]`
images of every class y (the most any cell asks of that generator) and is saved as <run>/pools/<name>.pt: a
resumed grid reads it back rather than sampling again. Every draw comes from a stream named by
(g, "pool", generation), and the families seed every sample on its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from simulator import registry, seeding, weights
from simulator import samples as store
from simulator.contamination.mixing import ContaminationError, Pool
from simulator.models.base import GenerativeModel
from simulator.options import choose
from simulator.rundir import RunDir

SAMPLES = ("auto", "saved", "model")
KINDS = ("train", "run", "external")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def loop_generations(run_dir: str | Path, field: str = "generator.run_dir") -> list[int]:
    """Committed generations of a loop run directory; a one-line error when it is not one."""
    path = Path(os.path.expanduser(str(run_dir)))
    if not path.is_dir():
        raise ContaminationError(f"{field}: no such run directory: {path}")
    if not (path / "config.yaml").is_file() or not (path / "gen_000").is_dir():
        raise ContaminationError(
            f"{field}: {path} is not a loop run directory (needs config.yaml and gen_000/)"
        )
    return RunDir(path).committed()


def pick_generation(spec: Any, committed: list[int], field: str) -> int:
    """'last' or an integer generation that the run has committed."""
    if spec == "last":
        return committed[-1]
    if isinstance(spec, bool) or not isinstance(spec, int) or spec not in committed:
        raise ContaminationError(
            f"{field}: generation {spec!r} is not committed (the run has 0..{committed[-1]})"
        )
    return spec


def _model_factory(model_cfg: dict, event_shape: tuple[int, ...], device: str) -> Any:
    cfg = OmegaConf.create({"model": model_cfg, "chains": 1})
    return registry.make_model_factory(cfg, event_shape, device)


def load_loop_model(run_dir: Path, t: int, event_shape: tuple[int, ...], device: str) -> GenerativeModel:
    """Generation t's model of a loop run, its family rebuilt from the run's own config.yaml."""
    cfg: DictConfig = OmegaConf.load(run_dir / "config.yaml")  # type: ignore[assignment]
    model = _model_factory(OmegaConf.to_container(cfg.model), event_shape, device)()  # type: ignore[arg-type]
    model.load_state_dict(weights.load_model(run_dir / f"gen_{t:03d}"))
    return model


def draw(
    models: list[GenerativeModel], need: list[int], generator: torch.Generator, temperature: float
) -> Pool:
    """need[y] samples of each class y: from one class-conditional model, or from models[y] per class."""
    if len(models) == 1 and getattr(models[0], "num_classes", None) is not None:
        labels = torch.repeat_interleave(torch.arange(len(need)), torch.tensor(need))
        images = models[0].sample(len(labels), labels, generator=generator, temperature=temperature)[0]
        return Pool(images.cpu(), labels)
    if len(models) != len(need):
        raise ContaminationError(
            f"labelled samples need a class-conditional model (num_classes) or one model per class; "
            f"got {len(models)} unconditional model(s) for {len(need)} classes"
        )
    parts = [
        m.sample(n, generator=seeding.child(generator, y), temperature=temperature)[0].cpu()
        for y, (m, n) in enumerate(zip(models, need, strict=True))
    ]
    return Pool(torch.cat(parts), torch.repeat_interleave(torch.arange(len(need)), torch.tensor(need)))


def saved(run_dir: Path, t: int, need: list[int], label: int | None = None) -> Pool | None:
    """The first need[y] saved samples of each class of generation t (i.i.d., so a uniform subset);
    None when the run kept no samples or too few of some class. `label` labels an unconditional run."""
    gen = run_dir / f"gen_{t:03d}"
    if not store.exists(gen):
        return None
    images = store.load(gen)[0]
    if label is not None:
        return (
            Pool(images[: need[label]], torch.full((need[label],), label))
            if len(images) >= need[label]
            else None
        )
    labels = store.load(gen, kind=store.LABELS)
    if labels is None:
        return None
    labels = labels[0].long()
    picks = []
    for y, n in enumerate(need):
        idx = (labels == y).nonzero().squeeze(1)[:n]
        if len(idx) < n:
            return None
        picks.append(idx)
    idx = torch.cat(picks)
    return Pool(images[idx], labels[idx])


def _fit_image(img: Any, event_shape: tuple[int, ...]) -> torch.Tensor:
    """A PIL image -> uint8 (ch, h, w) in the data's channels (L or RGB) and size (bicubic resize)."""
    from PIL import Image

    ch, h, w = event_shape
    img = img.convert("L" if ch == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.unsqueeze(0) if ch == 1 else arr.permute(2, 0, 1)


def load_external(path: str | Path, num_classes: int, event_shape: tuple[int, ...]) -> Pool:
    """Labelled images made elsewhere: an ImageFolder-style folder or a .npz (images, labels)."""
    from PIL import Image

    path = Path(os.path.expanduser(str(path)))
    field = "generator.path"
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as z:
            if "images" not in z or "labels" not in z:
                raise ContaminationError(f"{field}: {path} must hold arrays 'images' and 'labels'")
            images, labels = z["images"], z["labels"]
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ContaminationError(
                f"{field}: 'images' must be uint8 (n, h, w, c) or (n, c, h, w) with one label each, "
                f"got {images.dtype} {images.shape} and {len(labels)} labels"
            )
        channels_last = images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4)
        hwc = images if channels_last else images.transpose(0, 2, 3, 1)
        pics = [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x) for x in hwc]
        label_list = [int(v) for v in labels]
    elif path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise ContaminationError(f"{field}: {path} has no class subfolders (ImageFolder layout)")
        names = [f.name for f in folders]
        numbered = all(n.isdigit() for n in names)
        pics, label_list = [], []
        for i, folder in enumerate(folders):
            y = int(folder.name) if numbered else i
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    with Image.open(f) as img:
                        pics.append(img.copy())
                    label_list.append(y)
    else:
        raise ContaminationError(f"{field}: no such folder or .npz file: {path}")
    bad = [y for y in label_list if not 0 <= y < num_classes]
    if bad:
        raise ContaminationError(
            f"{field}: label {bad[0]} is outside the data's classes 0..{num_classes - 1}"
        )
    if not pics:
        raise ContaminationError(f"{field}: {path} holds no images")
    return Pool(torch.stack([_fit_image(p, event_shape) for p in pics]), torch.tensor(label_list))


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a new file: never written through a link planted under the temporary name
    torch.save(obj, tmp)
    os.replace(tmp, path)


class GeneratorSource:
    """The generated images of one contamination run, pooled per generation and cached in the run dir."""

    def __init__(
        self,
        spec: dict,
        run_path: Path,
        real: Pool,
        num_classes: int,
        event_shape: tuple[int, ...],
        *,
        device: str,
        seeds: list[int],
        attribute_of: Any = None,
        progress: bool = False,
        reals: dict[int, Pool] | None = None,  # generator replicate g's training images, where its own
    ) -> None:
        self.spec, self.run_path, self.real = spec, run_path, real
        self.reals = dict(reals or {})  # split.test=per_replicate: replicate g's own training partition
        self.num_classes, self.event_shape, self.device = num_classes, tuple(event_shape), device
        self.seeds, self.attribute_of, self.progress = list(seeds), attribute_of, progress
        self.kind = spec.get("kind", "train")
        self._cache: dict[tuple, Pool] = {}
        self.run_dirs: dict[int | None, list[Path]] = {}  # generator replicate -> its run dir(s)
        self.committed: list[int] = []
        if self.kind == "run":
            replicates = spec.get("replicates")
            if replicates:
                if len(replicates) != len(self.seeds):
                    raise ContaminationError(
                        f"generator.replicates: need one loop run per replicate seed ({len(self.seeds)}), "
                        f"got {len(replicates)}"
                    )
                for i, (s, d) in enumerate(zip(self.seeds, replicates, strict=True)):
                    self.run_dirs[s] = self._dirs([d], [f"generator.replicates[{i}]"])
            else:
                dirs = spec.get("run_dirs") or [spec.get("run_dir")]
                if dirs == [None]:
                    raise ContaminationError("generator.run_dir: a loop run directory is needed (kind: run)")
                fields = (
                    ["generator.run_dir"]
                    if spec.get("run_dirs") is None
                    else [f"generator.run_dirs[{i}]" for i in range(len(dirs))]
                )
                self.run_dirs[None] = self._dirs(dirs, fields)
        else:
            choose("generator.kind", self.kind, KINDS, error=ContaminationError)

    def _dirs(self, dirs: list, fields: list[str]) -> list[Path]:
        """Check loop run directories; keep the generations all of them have committed."""
        committed = [set(loop_generations(d, f)) for d, f in zip(dirs, fields, strict=True)]
        common = set.intersection(*committed)
        self.committed = sorted(common & set(self.committed)) if self.committed else sorted(common)
        paths = [Path(os.path.expanduser(str(d))) for d in dirs]
        if len(paths) > 1 and len(paths) != self.num_classes:
            raise ContaminationError(
                f"generator.run_dirs: need one run per class ({self.num_classes}), got {len(paths)}"
            )
        return paths

    def gen_seed(self, s: int) -> int | None:
        """The generator replicate that replicate seed s draws from: its own unless one is shared."""
        if self.kind == "run":
            return s if self.spec.get("replicates") else None
        if self.kind == "external":
            return None  # one fixed set of images
        shared = self.spec.get("seed")
        return s if shared is None else int(shared)

    def replicated(self) -> bool:
        """True when every replicate seed has its own generator (intervals then cover generator variance)."""
        return len({self.gen_seed(s) for s in self.seeds}) == len(self.seeds) > 1

    def default_generation(self) -> int | None:
        """The generation substitute/augment cells use: None for a spot-trained or external generator."""
        if self.kind != "run":
            return None
        return pick_generation(self.spec.get("generation", "last"), self.committed, "generator.generation")

    def generations(self) -> list[int]:
        """Generations the `generations` mode walks through (all committed ones unless listed)."""
        if self.kind != "run":
            raise ContaminationError("modes.generations needs generator.kind=run (a loop run directory)")
        wanted = self.spec.get("generations")
        if wanted is None:
            return list(self.committed)
        return [pick_generation(t, self.committed, "generator.generations") for t in wanted]

    def _spot_models(self, g: int) -> list[GenerativeModel]:
        """Generator replicate g trained on the spot, once, saved under <run>/generator/seed_<g>/."""
        per_class = bool(self.spec.get("per_class", False))
        options = dict(self.spec.get("options") or {})
        if not per_class:
            options["num_classes"] = self.num_classes
        factory = _model_factory(
            {"family": self.spec["family"], "options": options}, self.event_shape, self.device
        )
        names = [f"class_{y:02d}.pt" for y in range(self.num_classes)] if per_class else ["model.pt"]
        real = self.reals.get(g, self.real)
        final = self.run_path / "generator" / f"seed_{g}"
        if not final.is_dir():  # train, then rename the whole directory: a crash leaves nothing half-made
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for y, name in enumerate(names):
                rows = (real.labels == y) if per_class else torch.ones(len(real), dtype=torch.bool)
                model = factory()
                model.reset(seeding.generator(g, "generator", name, "init"))
                model.fit(
                    real.images[rows].unsqueeze(0),
                    None if per_class else real.labels.unsqueeze(0),
                    steps=self.spec.get("steps"),
                    generator=seeding.generator(g, "generator", name),
                    progress=self.progress,
                )
                torch.save(model.state_dict(), tmp / name)
            os.replace(tmp, final)
        models = []
        for name in names:
            model = factory()
            model.load_state_dict(_load(final / name))
            models.append(model)
        return models

    def pool(self, t: int | None, g: int | None, need: list[int]) -> Pool:
        """need[y] generated images of every class y from generation t (None: the on-the-spot generator) of
        generator replicate g."""
        if (t, g) in self._cache:
            return self._cache[t, g]
        name = (("external" if self.kind == "external" else "spot") if t is None else f"gen_{t:03d}") + (
            "" if g is None else f"_seed{g}"
        )
        path = self.run_path / "pools" / f"{name}.pt"
        stored = _load(path) if path.exists() else None
        if stored is not None and stored["need"].tolist() == list(need):
            pool = Pool(stored["images"], stored["labels"])
        else:
            pool = self._make(t, g, need)
            _save_atomic({"images": pool.images, "labels": pool.labels, "need": torch.tensor(need)}, path)
        if tuple(pool.images.shape[1:]) != self.event_shape:
            raise ContaminationError(
                f"generator images have shape {tuple(pool.images.shape[1:])}, the data {self.event_shape}: "
                "the loop run was trained on another data source"
            )
        if self.attribute_of is not None:
            pool.attrs = self.attribute_of(pool.images)
        self._cache[t, g] = pool
        return pool

    def _external(self, need: list[int], stream: torch.Generator) -> Pool:
        """A uniform random need[y]-subset of each class of the external images."""
        images = load_external(self.spec.get("path"), self.num_classes, self.event_shape)
        order = [
            (images.labels == y)
            .nonzero()
            .squeeze(1)[torch.randperm(int((images.labels == y).sum()), generator=stream)]
            for y in range(len(need))
        ]
        for y, (o, n) in enumerate(zip(order, need, strict=True)):
            if len(o) < n:
                raise ContaminationError(
                    f"generator.path: holds {len(o)} images of class {y}, the grid needs {n}"
                )
        return images.take(torch.cat([o[:n] for o, n in zip(order, need, strict=True)]))

    def _make(self, t: int | None, g: int | None, need: list[int]) -> Pool:
        mode = choose(
            "generator.samples", self.spec.get("samples", "auto"), SAMPLES, error=ContaminationError
        )
        root = (self.spec.get("seed") or 0) if g is None else g  # a shared loop run: generator.seed or 0
        stream = seeding.generator(root, "pool", "spot" if t is None else t)
        temperature = float(self.spec.get("temperature", 1.0))
        if self.kind == "external":
            return self._external(need, stream)
        if t is None:
            return draw(self._spot_models(g), need, stream, temperature)  # type: ignore[arg-type]
        run_dirs = self.run_dirs[g]
        if mode != "model":
            if len(run_dirs) == 1:
                got = saved(run_dirs[0], t, need)
            else:
                parts = [saved(d, t, need, label=y) for y, d in enumerate(run_dirs)]
                got = (
                    None
                    if any(p is None for p in parts)
                    else Pool(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
                )
            if got is not None:
                return got
            if mode == "saved":
                raise ContaminationError(
                    f"generator.samples=saved: generation {t} kept too few samples of some class; use auto"
                )
        models = [load_loop_model(d, t, self.event_shape, self.device) for d in run_dirs]
        return draw(models, need, stream, temperature)
