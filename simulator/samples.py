"""A generation's samples on disk: one file for cheap toy draws, resumable shards for images.

    gen_XXX/samples.pt, labels.pt                  families without per-sample seeds (toy, float)
    gen_XXX/samples_00000.pt, labels_00000.pt, ..  families with per-sample seeds: shard k holds rows
                                                   k*size .. (k+1)*size - 1 of the draw (uint8 for images)

A shard is written atomically (a temporary file, then a rename), labels first and samples last, so a
samples file means a whole shard: a process killed while sampling resumes from its last whole shard.
Each file's checksum is recorded as it is written (simulator.scratch); a resume redraws every shard whose
files fail it (altered, truncated, replaced), after one warning line.
Readers load shards memory-mapped (torch.load(..., mmap=True)) and copy out only the rows they need,
so no reader holds every generation's samples, or one generation's as float32, in memory.

Under torch.distributed every rank computes its round-robin part of each shard (simulator.distributed),
the parts are gathered, and rank 0 alone writes; the other ranks read the files after a barrier.

`SamplePool` is how the generation loop draws S_t and how its policy reads S_0, S_1, ... back (the
members of D_t); `StatisticsPool` is the same for a run on sufficient statistics (model.path=statistics),
whose members are the statistics of those rows, never the rows.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from simulator import correction, distributed, scratch, seeding, selection, verification, weights
from simulator.correction import Correct
from simulator.curation import Reward, soft_select
from simulator.data.base import Dataset, draw_labels
from simulator.models.base import FitsStatistics
from simulator.options import ConfigError
from simulator.policies import REAL, TRUTH, Part, Policy, assemble, curate, draw_truth
from simulator.rundir import write_atomic

if TYPE_CHECKING:
    from simulator.rundir import RunDir

SAMPLES, LABELS = "samples", "labels"
PARTIAL = scratch.PARTIAL  # where save_atomic writes before its rename
DEFAULT_SHARD_SIZE = 5000  # rows per shard when sample.shard_size is null
_SHARD = re.compile(r"^(samples|labels)_(\d{5})\.pt$")


def shard_name(kind: str, k: int) -> str:
    return f"{kind}_{k:05d}.pt"


def shard_ranges(n: int, size: int) -> list[range]:
    """Rows of each shard of an n-row draw: [0, size), [size, 2 size), ..."""
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def save_atomic(obj: object, path: Path, durable: bool = True) -> None:
    """torch.save (safetensors for a .safetensors path: simulator.weights) through a temporary file and a
    rename, with its checksum recorded: readers never see half a file, and resumes check it (scratch.save;
    the loop writes every file of gen_XXX.tmp through here). RunDir.commit removes `.partial/`."""
    scratch.save(obj, path, durable)


def _load(path: Path) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def shards(directory: Path, kind: str = SAMPLES) -> list[Path]:
    """The shard files of `kind` in directory, in row order (contiguous from 0; a gap ends the list)."""
    found = {int(m.group(2)) for p in directory.glob(f"{kind}_*.pt") if (m := _SHARD.match(p.name))}
    out: list[Path] = []
    while len(out) in found:
        out.append(directory / shard_name(kind, len(out)))
    return out


def exists(directory: Path) -> bool:
    """True when directory holds samples (one file or at least one shard)."""
    return (directory / f"{SAMPLES}.pt").exists() or (directory / shard_name(SAMPLES, 0)).exists()


def load(directory: Path, rows: int | None = None, kind: str = SAMPLES) -> torch.Tensor | None:
    """The first `rows` rows (all when None) of a generation's samples or labels, (C, rows, ...).

    Labels come back as saved: (C, n) with the chain dimension expanded. None when there are none.
    Shards are memory-mapped and only the rows asked for are copied into memory.
    """
    whole = directory / f"{kind}.pt"
    if whole.exists():
        x = _load(whole)
        return x if rows is None else x[:, :rows]
    paths, counts, have = [], [], 0
    for path in shards(directory, kind):  # first pass: the row count of each shard needed
        if rows is not None and have >= rows:
            break
        n = _load(path).shape[1]
        paths.append(path)
        counts.append(n if rows is None else min(n, rows - have))
        have += counts[-1]
    if not paths:
        return None
    out, pos, chains = None, 0, 1
    for path, take in zip(paths, counts, strict=True):  # copy shard by shard; each mapping is released
        x = _load(path)
        if out is None:
            chains = x.shape[0]
            expanded = chains > 1 and x.stride(0) == 0  # labels are saved expanded over the chains
            out = x.new_empty(1 if expanded else chains, have, *x.shape[2:])
        out[:, pos : pos + take] = x[: out.shape[0], :take]
        pos += take
        del x
    return out.expand(chains, *out.shape[1:])


def remove(directory: Path) -> None:
    """Delete every sample and label file of directory (sample.save=false: they are redrawn on demand)."""
    for kind in (SAMPLES, LABELS):
        for path in [directory / f"{kind}.pt", *directory.glob(f"{kind}_*.pt")]:
            scratch.forget(path)


def whole_shards(directory: Path, n_shards: int, corrupt: Path | None) -> set[int]:
    """The shards k < n_shards that directory holds whole: samples_k (and labels_k, where the draw has
    labels) present and matching their recorded checksums. A file that fails is set aside (scratch.check:
    into corrupt/, one warning line) and its shard is drawn again."""
    records = directory / PARTIAL
    labeled = any(directory.glob(f"{LABELS}_*.pt")) or any(records.glob(f"{LABELS}_*.pt{scratch.RECORD}"))
    done = set()
    for k in range(n_shards):
        x, y = directory / shard_name(SAMPLES, k), directory / shard_name(LABELS, k)
        if not (x.exists() or x.is_symlink()):
            continue  # never finished (labels are written first): drawn as if new, without a word
        then = f"redrawing shard {k}"
        ok = scratch.check(x, corrupt, then)
        # labels_k is written before samples_k: with samples_k there, a missing labels_k was lost
        if ok and (not labeled or scratch.check(y, corrupt, then, required=True)):
            done.add(k)
    return done


def write_shards(
    directory: Path,
    n: int,
    size: int,
    make: Callable[[range], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    write: bool,
    durable: bool = True,
    corrupt: Path | None = None,  # where a shard file that fails its checksum goes (None: deleted)
) -> int:
    """Compute and save every shard of an n-row draw that directory does not hold whole; returns how many.

    make(rows) gives (samples (C, len(rows), ...), labels (C, len(rows)) or None); it runs on every rank
    (it may use collectives), in the same shard order everywhere. Only the rank with `write` saves, and
    the set of shards already whole (`whole_shards`: checked against their checksums) is rank 0's,
    broadcast, so every rank skips the same ones.
    """
    ranges = shard_ranges(n, size)
    done = whole_shards(directory, len(ranges), corrupt) if write else set()
    done = distributed.broadcast_object(done)
    made = 0
    for k, rows in enumerate(ranges):
        if k in done:
            continue
        x, y = make(rows)
        if write:
            if y is not None:
                save_atomic(y, directory / shard_name(LABELS, k), durable)
            save_atomic(x, directory / shard_name(SAMPLES, k), durable)  # last: marks the shard whole
        made += 1
    return made


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """(C, n, ...) from every rank's `local` (C, len(distributed.shard(n)), ...): rows back in place."""
    x = distributed.gather_shards(local.movedim(1, 0).contiguous(), n).movedim(0, 1)
    return x.clone(memory_format=torch.contiguous_format)  # canonical strides: the same file bytes


def save_grid(images: Any, path: Path, nrow: int = 8, durable: bool = True) -> None:
    """Save uint8 images (n, ch, h, w) as one PNG grid with a 1-pixel border (PIL only, no matplotlib),
    rendered in memory and written by rundir.write_atomic (a rename: never through a link at path)."""
    from PIL import Image

    n, ch, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((ch, rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i]
    array = grid.permute(1, 2, 0).squeeze(-1).numpy()
    scale = max(1, 256 // max(grid.shape[1:]))  # blow tiny grids (8x8 digits) up for viewing
    image = Image.fromarray(array, mode="L" if ch == 1 else "RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="png")
    write_atomic(path, buf.getvalue(), durable)


# -- the pool of a run: how S_t is drawn, and how D_t reads S_0, S_1, ... back ------------------------------


@dataclass(frozen=True)
class SampleOptions:
    """How each generation's samples S_t are drawn (the config's sample section)."""

    n: int | None = None  # samples per generation (default: what the policy needs)
    temperature: float = 1.0  # sampling bias s: s < 1 narrows the samples
    guidance: float | None = None  # classifier-free guidance weight w (class-conditional diffusion)
    curation_k: int = 1  # keep the best of k candidates per sample (1: no curation)
    curation_reward: str | Reward = "model"  # "model"/"truth" (log-density), or reward(m, x, y) -> (C, m)
    curation_beta: float | None = None  # None: best of k; else keep candidate i w.p. softmax(beta r)_i
    correction: str | Correct | None = None  # truth | kmeans | c(x, labels, generator) (simulator.correction)
    correction_strength: float | None = None  # gamma: a row corrected w.p. gamma/(1+gamma) (None: always)
    correction_options: dict[str, Any] | None = None  # the correction's options (kmeans: k, per_class, ..)
    label_noise: float | None = None  # P(a candidate's label is another class) (simulator.verification)
    verifier: str | None = None  # oracle: keep the first of curation_k candidates it accepts
    verifier_options: dict[str, Any] | None = None  # oracle: keep_correct, keep_wrong (its error rates)
    selection: str | None = None  # greedy | threshold: n of k n candidates by entropy (simulator.selection)
    selection_k: int = 2  # candidates per kept sample
    selection_threshold: float | None = None  # threshold: the first tau (None: the median NN distance)
    selection_decay: float = 0.95  # threshold: tau's factor after each pass


class SamplePool:
    """A run's samples S_0, S_1, ...: drawn by the loop, read back as the members of the policy's D_t.

    S_t is n_draw samples of G_t from the stream (seed, t, "sample"), with class labels for a conditional
    family (drawn in the real set's proportions from (seed, t, "labels")), each kept from curation_k
    candidates by the curation reward. A family with per-sample seeds (IndexedSampling) draws S_t in
    resumable shards, each rank its round-robin part (`draw_rows`); the others draw it whole on every rank
    (`draw`). Saved samples are read back from disk, memory-mapped; unsaved ones are held while the policy
    needs them, or redrawn exactly from the generation's saved model.
    """

    def __init__(
        self, run: RunDir, data: Dataset, make_model: Callable[[], Any], policy: Policy, *, seed: int,
        n_draw: int, n_eval: int, options: SampleOptions, conditional: bool, indexed: bool, save: bool = True,
        shard_size: int | None = None,
    ) -> None:  # fmt: skip
        self.run, self.data, self.make_model, self.policy = run, data, make_model, policy
        self.seed, self.n_draw, self.n_eval, self.options = seed, n_draw, n_eval, options
        self.conditional, self.indexed, self.save = conditional, indexed, save
        self.per_shard = shard_size or DEFAULT_SHARD_SIZE
        self.chains, self.n_real = data.train.shape[0], data.n_train
        self.n_pool, self.n_truth = policy.pool_size(self.n_real), policy.n_truth(self.n_real)
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # not on disk (toy, unsaved)
        guidance = {"guidance": options.guidance} if options.guidance else {}
        self.bias = {"temperature": options.temperature, **guidance}  # sample()'s options
        self.corrector = correction.make(options.correction, options.correction_strength,
                                         options.correction_options, data, seed)  # fmt: skip
        self.verifier = None  # label noise and the verifier's keep/drop (simulator.verification)
        if options.verifier is not None or options.label_noise:
            noise, classes = options.label_noise or 0.0, self._classes(data)
            self.verifier = verification.Verifier(
                options.verifier, noise, options.verifier_options, classes, seed
            )

    # -- drawing S_t --
    def labels(self, t: int, n: int) -> torch.Tensor | None:
        """Classes of the n candidates of S_t, in the proportions of the real training set."""
        if not self.conditional:
            return None
        return draw_labels(self.data.train_labels[0], n, seeding.generator(self.seed, t, "labels"))

    def keep_best(
        self, m: Any, x: torch.Tensor, y: torch.Tensor | None, t: int, rows: list[int] | slice
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Curation: one of each k consecutive candidates (samples `rows` of S_t), the best by the reward
        or, with curation_beta, one drawn with probability softmax(beta * reward) (simulator.curation)."""
        k, beta, reward_of = self.options.curation_k, self.options.curation_beta, self.options.curation_reward
        if self.verifier is not None:  # label noise and the verifier's keep/drop (simulator.verification)
            mine = range(self.n_draw) if isinstance(rows, slice) else rows
            return self.verifier.keep(x, y, t, mine, k, self.n_draw)
        if callable(reward_of):
            reward = reward_of(m, x, y)
        else:
            reward = m.log_prob(x) if reward_of == "model" else self.data.truth.log_prob(x)
        if beta is None:
            keep = curate(reward.cpu(), k)
        else:  # one uniform per sample of S_t, whichever rank draws it
            g = seeding.generator(self.seed, t, "curation")
            u = torch.rand(x.shape[0], self.n_draw, generator=g, dtype=torch.float64)
            keep = soft_select(reward.cpu(), k, beta, u[:, rows])
        return x[torch.arange(x.shape[0]).unsqueeze(1), keep], None if y is None else y[keep[0]]

    @staticmethod
    def _classes(data: Dataset) -> int:
        return 0 if data.train_labels is None else int(data.train_labels.max()) + 1

    def draw(self, m: Any, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S_t: n_draw samples of m (with their class labels for a class-conditional family)."""
        if self.options.selection is not None:  # n_draw of k n_draw candidates, by entropy
            return selection.draw(self, m, t)
        k = self.options.curation_k
        y = self.labels(t, self.n_draw * k)
        g = seeding.generator(self.seed, t, "sample")
        x = m.sample(self.n_draw * k, y, generator=g, **self.bias).cpu()
        if k > 1 or self.verifier is not None:
            x, y = self.keep_best(m, x, y, t, slice(None))
        return x, None if y is None else y if y.dim() == 2 else y.unsqueeze(0).expand(x.shape[0], -1)

    def draw_rows(self, m: Any, t: int, rows: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `rows` of S_t (equal to draw(m, t)[:, rows]) for a per-sample-seeded family; each rank
        draws its round-robin part (with its curation candidates) and the parts are gathered."""
        if self.options.selection is not None:  # the shard's rows, of k times as many candidates
            return selection.draw_rows(self, m, t, rows)
        k, mine = self.options.curation_k, [rows[i] for i in distributed.shard(len(rows))]
        candidates = [i * k + j for i in mine for j in range(k)]
        y_all = self.labels(t, self.n_draw * k)
        x = m.sample(self.n_draw * k, y_all, generator=seeding.generator(self.seed, t, "sample"),
                     indices=candidates, **self.bias).cpu()  # fmt: skip
        y = None if y_all is None else y_all[candidates]
        if k > 1 or self.verifier is not None:
            x, y = self.keep_best(m, x, y, t, mine)
        x = gather_rows(x, len(rows))
        if y is not None and y.dim() == 2:  # per-chain labels (verification's reported ones)
            return x, gather_rows(y, len(rows))
        y = None if y is None else distributed.gather_shards(y, len(rows))
        return x, None if y is None else y.unsqueeze(0).expand(x.shape[0], -1)

    def generate(self, model: Any, t: int, tmp: Path, *, metrics: bool, write: bool, durable: bool,
                 corrupt: Path | None) -> torch.Tensor:  # fmt: skip
        """Draw S_t into gen_XXX.tmp (a resume keeps its whole shards); returns what the metrics see: its
        first n_eval rows (without metrics, at most 64 of them for the sample grid)."""
        if self.indexed:  # resumable shards in gen_XXX.tmp, each drawn across the ranks
            make = partial(self.draw_rows, model, t)
            write_shards(tmp, self.n_draw, self.per_shard, make, write=write, durable=durable,
                         corrupt=corrupt)  # fmt: skip
            distributed.barrier()  # the other ranks read what rank 0 wrote
            return load(tmp, self.n_eval if metrics else min(self.n_eval, 64))
        self.held[t] = x, y = self.draw(model, t)  # cheap (toy) families: one draw on every rank
        if write and self.save:  # drawn again by every life that gets here: never read from tmp
            save_atomic(x, tmp / "samples.pt", durable)
            if y is not None:
                save_atomic(y, tmp / "labels.pt", durable)
        return x[:, : self.n_eval]

    def release(self, t: int) -> None:
        """Drop held samples after S_t is drawn: saved ones are read back from disk, unsaved ones are kept
        while a later D reads them."""
        for old in [g for g in self.held if g not in self.policy.needs(t + 1) or (self.save and g < t)]:
            del self.held[old]

    def finish(self, model: Any, t: int, tmp: Path, seen: torch.Tensor, *, durable: bool) -> None:
        """Rank 0, before the commit: drop unsaved shards (redrawn from the model file when a later
        generation needs them) and write the sample grid of image samples."""
        if self.indexed and not self.save:
            remove(tmp)
        if seen.dim() == 5:  # images (C, n, ch, h, w): a sample grid per generation
            save_grid(seen[0, :64], tmp / "samples.png", durable=durable)

    # -- reading S_0, S_1, ... back --
    def read(self, t: int, rows: int | None = None, kind: str = SAMPLES) -> torch.Tensor:
        """The first `rows` samples (or labels) of S_t: from disk when saved, else held or redrawn."""
        if t not in self.held and exists(self.run.gen_dir(t)):
            return load(self.run.gen_dir(t), rows, kind)
        if t not in self.held:  # sample.save=false: regenerate them exactly from the saved model
            m = self.make_model()
            self.restore(m, self.run.gen_dir(t))
            self.held[t] = self.draw_rows(m, t, range(self.n_draw)) if self.indexed else self.draw(m, t)
        x = self.held[t][0 if kind == SAMPLES else 1]
        return x if rows is None else x[:, :rows]

    def member(self, member: int, t: int) -> torch.Tensor:
        """The rows of one pool member as D_t reads them: the real set, generation t's fresh rows of the
        exact sampler (TRUTH), or S_g's first n_pool."""
        if member == TRUTH:
            return draw_truth(self.data.truth, self.n_truth, self.chains, self.seed, t)
        if member == REAL:
            return self.data.train
        x = self.read(member, self.n_pool)
        if self.corrector is None:  # self-correction: S_g's rows as D_t reads them (simulator.correction)
            return x
        return self.corrector(x, self.read(member, self.n_pool, LABELS) if self.conditional else None, member)

    def member_labels(self, member: int) -> torch.Tensor:
        return self.data.train_labels if member == REAL else self.read(member, self.n_pool, LABELS)

    def sizes(self, t: int) -> dict[int, int]:
        """Rows of each member D_t may read."""
        return {REAL: self.n_real, TRUTH: self.n_truth, **dict.fromkeys(range(t), self.n_pool)}

    def training_set(self, t: int, parts: list[Part] | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """D_t gathered from the policy's parts (None: generation 0's real set as it is), its labels (a
        conditional family) and its number of rows."""
        if parts is None:
            return self.data.train, self.data.train_labels if self.conditional else None, self.n_real
        sizes = self.sizes(t)
        train = assemble(parts, lambda m: self.member(m, t), self.chains, sizes)
        labels = assemble(parts, self.member_labels, self.chains, sizes) if self.conditional else None
        return train, labels, train.shape[1]

    # -- the model of a generation --
    def fit(self, model: Any, train: Any, labels: torch.Tensor | None, **kwargs: Any) -> dict[str, Any]:
        """Fit model to D_t; returns the row's training stats."""
        return model.fit(train, labels, **kwargs)

    def loaded(self, source: str | Path) -> dict[str, Any]:
        """The row's training stats of a generation 0 loaded from source instead of fitted."""
        return {"loaded": str(source)}

    def set_state(self, model: Any, state: dict[str, Any]) -> None:
        """Load a model file's state into model (init.checkpoint, or a generation's)."""
        model.load_state_dict(state)

    def restore(self, model: Any, directory: Path) -> None:
        """Load the model of a generation's directory (gen_XXX or gen_XXX.tmp) into model."""
        model.load_state_dict(weights.load_model(directory))


class StatisticsPool(SamplePool):
    """A run's pool on sufficient statistics (model.path=statistics; a FitsStatistics family): every member
    of D_t is the statistics of its rows -- the real set's, the truth's fresh draw's, S_g's first n_pool's
    -- and D_t's are their sum in the policy's order, so G_t is what the sample path fits, in
    distribution, without a sample ever drawn. A part must take whole members, or the first n_pool rows
    of one S_g: a random subset of rows, a weighting or curation depend on the rows themselves, and such a
    policy is refused when the pool is made.

    gen_XXX/statistics.pt holds G_t's exact parameters (statistics_state), S_t's statistics ("syn") and,
    when D_t pools whole members (accumulate), D_t's ("pool"), which D_{t+1} extends by one member.
    """

    STATE = "statistics.pt"

    def __init__(
        self, run: RunDir, data: Dataset, make_model: Callable[[], Any], policy: Policy, *, seed: int,
        n_draw: int, n_eval: int, options: SampleOptions, metrics: Sequence[str],
    ) -> None:  # fmt: skip
        super().__init__(run, data, make_model, policy, seed=seed, n_draw=n_draw, n_eval=n_eval,
                         options=options, conditional=False, indexed=False)  # fmt: skip
        model = make_model()
        if not isinstance(model, FitsStatistics):
            raise ConfigError(f"model.path: statistics needs a family that fits from sufficient statistics; "
                              f"{type(model).__name__} does not (use model.path=samples)")  # fmt: skip
        self._refuse(model, metrics)
        self.model = model  # the statistics' own methods (the type of the real set's, the truth draws)
        self.real = model.statistics_of(data.train)
        reads = set(metrics) & set(model.sample_statistics_metrics)  # a metric of S_t's first n_eval rows
        self.sample_sizes = [self.n_pool, *([n_eval] if reads else [])]
        self.syn: dict[int, Any] = {}  # S_g's first n_pool rows' statistics, while D reads them
        self.fold: tuple[int, tuple[int, ...], Any] | None = None  # (t, members, their sum): a pooled part

    def _refuse(self, model: Any, metrics: Sequence[str]) -> None:
        """One ConfigError line for what statistics cannot reproduce (the config's check says it first)."""
        unknown = [name for name in metrics if name not in model.statistics_metrics]
        if unknown:
            raise ConfigError(f"eval.metrics: {unknown[0]} needs samples; model.path=statistics computes "
                              f"{', '.join(model.statistics_metrics)}")  # fmt: skip
        if self.options.curation_k != 1:
            raise ConfigError("sample.curation_k: curation ranks individual samples, which "
                              "model.path=statistics never draws; use 1 or model.path=samples")  # fmt: skip
        if self.options.correction is not None:
            raise ConfigError("sample.correction: corrections act on rows, which model.path=statistics never "
                              "draws; use model.path=samples")  # fmt: skip
        if self.options.guidance:
            raise ConfigError("sample.guidance: guidance is not drawn by model.path=statistics; use "
                              "model.path=samples")  # fmt: skip
        if self.n_truth:  # fresh points of the truth: their statistics' law must be known (a Gaussian)
            try:
                model.truth_statistics(self.data.truth, 1, torch.Generator())
            except ValueError as e:
                raise ConfigError(f"policy.source: {e}; use model.path=samples") from None
        parts = self.policy.select(1, self.n_real, self.chains, torch.Generator())  # D_1: its shape is D_t's
        if self.policy.weights(parts, self.sizes(1)) is not None:
            raise ConfigError("policy.weight_real: weighted fits are not drawn by model.path=statistics; use "
                              "model.path=samples")  # fmt: skip
        for part in parts:
            self._first_rows(part)

    def _first_rows(self, part: Part) -> bool:
        """True for a part of the first n_pool rows of one member; False for whole members; else refused."""
        if part.index is None:
            return False
        first = torch.arange(self.n_pool).expand(part.index.shape[0], self.n_pool)
        if len(part.members) != 1 or part.index.shape != first.shape or not torch.equal(part.index, first):
            raise ConfigError(f"policy: {self.policy.describe()} trains on a subset of rows, which their "
                              "statistics do not determine; use model.path=samples")  # fmt: skip
        return True

    def member(self, member: int, t: int) -> Any:
        if member == REAL:
            return self.real
        if member == TRUTH:  # generation t's fresh points of the truth, from the policy's stream
            g = seeding.generator(self.seed, t, "policy")
            return self.model.truth_statistics(self.data.truth, self.n_truth, g)
        if member not in self.syn:  # after a resume
            state = torch.load(self.run.gen_dir(member) / self.STATE, map_location="cpu", weights_only=True)
            self.syn[member] = self.model.load_statistics(state["syn"])
        return self.syn[member]

    def _part(self, t: int, part: Part) -> Any:
        """The statistics of one part: its members summed in order (an accumulating pool extends the last
        sum by its new members: the same additions, once each), or the first rows of one member."""
        if self._first_rows(part):
            return self.member(part.members[0], t)
        members, start, total = part.members, 0, None
        if self.fold is not None and members[: len(self.fold[1])] == self.fold[1]:
            start, total = len(self.fold[1]), self.fold[2]
        for m in members[start:]:
            total = self.member(m, t) if total is None else total + self.member(m, t)
        if len(members) > 1:
            self.fold = (t, members, total)
        return total

    def training_set(self, t: int, parts: list[Part] | None) -> tuple[Any, None, int]:
        if parts is None:
            return self.real, None, self.real.count
        total = None
        for part in parts:
            total = self._part(t, part) if total is None else total + self._part(t, part)
        return total, None, total.count

    def fit(self, model: Any, train: Any, labels: torch.Tensor | None, **kwargs: Any) -> dict[str, Any]:
        return {**model.fit_statistics(train), "path": "statistics"}  # steps and the rest: a closed form

    def loaded(self, source: str | Path) -> dict[str, Any]:
        return {**super().loaded(source), "path": "statistics"}

    def generate(self, model: Any, t: int, tmp: Path, **kwargs: Any) -> Any:
        """Draw the statistics of S_t's first n_pool rows (kept for D_{t+1}) and of its first n_eval (the
        metrics', when one reads samples), one draw cut in blocks; returns the n_eval rows' or None."""
        g = seeding.generator(self.seed, t, "sample")
        drawn = model.sample_statistics(self.sample_sizes, generator=g, temperature=self.options.temperature)
        self.syn[t] = drawn[0]
        return drawn[1] if len(drawn) > 1 else None

    def release(self, t: int) -> None:
        pooled = set(self.fold[1]) if self.fold is not None else set()  # inside the kept sum
        keep = (set(self.policy.needs(t + 1)) - pooled) | {t}
        for old in [g for g in self.syn if g not in keep]:
            del self.syn[old]

    def finish(self, model: Any, t: int, tmp: Path, seen: Any, *, durable: bool) -> None:
        state = {**model.statistics_state(), "syn": self.syn[t].to_dict()}
        if self.fold is not None and self.fold[0] == t:
            state["pool"] = self.fold[2].to_dict()
        save_atomic(state, tmp / self.STATE, durable)

    def set_state(self, model: Any, state: dict[str, Any]) -> None:
        model.load_statistics_state(state)

    def restore(self, model: Any, directory: Path) -> None:
        model.load_statistics_state(torch.load(directory / self.STATE, map_location="cpu", weights_only=True))
