"""The contamination grid: one classifier per cell, each cell committed whole like a loop generation.

    cells = reference, baselines x seeds, then mode x ratio (x generator generation) x seeds
    for cell i (skipping committed ones):
        D_i   = mix(mode, ratio, real split, generated pool | held-out reserve)
        f_i   = train(classifier, D_i)                      # seeded by the replicate (classifier) seed
        row_i = accuracy on clean and shifted test sets, bias metrics, generator statistics
        commit(i)                                           # gen_XXX/ = cell XXX; results.jsonl row

Cell i lives in RunDir's gen_{i:03d}/ (a RunDir keyed by "cell") and its row's "cell" key is i; the
generator generation a cell's images come from is "gen_t". Cell 0 is the reference: the standard
real-trained classifier, whose weights are kept to score generated images and see their classes.

The real data are a Setup per replicate seed (prepare_replicates): one shared by all (split.draw and
split.test fixed, the default), or replicate s's own classifier/reserve split and test shifts (draw) and
own train/test partition (test), so that intervals over replicates cover that variance too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from simulator import classifiers, seeding
from simulator.contamination import bias, released, shifts
from simulator.contamination.mixing import (
    GENERATED,
    HELDOUT,
    MODES,
    REAL,
    ContaminationError,
    Pool,
    class_orders,
    class_sizes,
    extra_per_class,
    mix,
    split_real,
)
from simulator.contamination.sources import GeneratorSource
from simulator.data.base import Dataset
from simulator.rundir import RunDir, RunError, write_atomic
from simulator.strict_json import strict_row

TRAIN_KEYS = ("batch_size", "lr", "weight_decay", "optimizer", "augment")
NET_KEYS = ("width", "hidden")


@dataclass(frozen=True)
class Cell:
    """One classifier to train: what data (mode, ratio, generator generation) and which replicate seed."""

    kind: str  # "reference" (real only, the main classifier), "baseline" (real only) or "contaminated"
    mode: str  # a mixing mode; reference and baselines are substitute at ratio 0
    ratio: float
    seed: int  # replicate seed
    classifier: tuple = ()  # (key, value) pairs overriding the main classifier config (baselines)
    gen_t: int | None = None  # generator generation of its generated images (None: no generator or spot)
    gen_seed: int | None = None  # which generator replicate made them (None: the one shared loop run)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "ratio": self.ratio,
            "seed": self.seed,
            "gen_t": self.gen_t,
            "gen_seed": self.gen_seed,
            **dict(self.classifier),
        }


def plan(
    modes: dict[str, list[float]],
    seeds: list[int],
    baselines: list[dict],
    default_t: int | None,
    generations: list[int],
    gen_seed: Any = None,  # replicate seed -> generator replicate of its cells (GeneratorSource.gen_seed)
) -> list[Cell]:
    """Every cell of the grid, in the order they are trained (the reference first).

    A contaminated cell of replicate s takes its generated images from generator replicate gen_seed(s): its
    own generator when every replicate trains one (so an interval over seeds covers generator variance).
    """
    cells = [Cell("reference", "substitute", 0.0, seeds[0])]
    for spec in baselines:
        for s in seeds:
            cell = Cell("baseline", "substitute", 0.0, s, tuple(sorted(spec.items())))
            if cell not in cells:
                cells.append(cell)
    for mode in MODES:
        for r in modes.get(mode) or []:
            for t in generations if mode == "generations" else [default_t]:
                for s in seeds:
                    generated = mode != "control" and r > 0
                    cells.append(
                        Cell(
                            "contaminated",
                            mode,
                            float(r),
                            s,
                            gen_t=t if mode != "control" else None,
                            gen_seed=gen_seed(s) if generated and gen_seed is not None else None,
                        )
                    )
    return cells


@dataclass
class Setup:
    """The real data of a grid: classifier split, held-out reserve, test sets, attribute bookkeeping."""

    full: Pool  # every real training image (what generators trained on)
    real: Pool  # the classifier's real training split
    reserve: Pool  # held-out real images after the control shift (the control substitutes)
    test: Pool
    test_sets: dict[str, torch.Tensor]  # shift name -> shifted copy of test.images, or a released test set
    num_classes: int
    num_attrs: int = 0
    aligned: torch.Tensor | None = None
    attribute_of: Any = None
    sizes: list[int] = field(default_factory=list)  # real split's class sizes
    test_labels: dict[str, torch.Tensor] = field(default_factory=dict)  # released sets' own labels


def prepare(
    data: Dataset,
    *,
    seed: int,  # the data seed: the real split, the control's shift and the shifted test sets
    split_fraction: float,
    control_shift: str | None,
    control_severity: int,
    shift_names: list[str],  # computed shifts (shifts.SHIFTS) and released sets (released.is_released)
    severity: int | list[int],  # one severity, or a list: a test set per (shift, severity)
    cifar10c_root: str | None = None,  # the released sets' folders (released.py)
    cifar10_1_root: str | None = None,
    given: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,  # released sets already read
) -> Setup:
    """Split the real training images, shift the reserve and the test set; all from seed's streams. The
    released test sets named among shift_names are read from their folders (unless given), with their own
    labels."""
    num_classes = _num_classes(data)
    attrs = getattr(data, "train_attrs", None)
    full = Pool(data.train[0], data.train_labels[0].long(), None if attrs is None else attrs[0].long())
    keep, rest = split_real(full.labels, split_fraction, seeding.generator(seed, "split"))
    reserve = full.take(rest)
    if control_shift and len(reserve) and reserve.images.dim() == 4:
        reserve.images = shifts.apply(
            control_shift, reserve.images, control_severity, seeding.generator(seed, "control")
        )
    test_attrs = getattr(data, "test_attrs", None)
    test = Pool(data.test, data.test_labels.long(), test_attrs)
    images = data.test.dim() == 4
    computed = [n for n in shift_names if not released.is_released(n)]
    sets = (
        shifts.shifted_sets(data.test, computed, severity, seeding.generator(seed, "test-shifts"))
        if images
        else {}
    )
    if given is None:
        given = released.load_all(
            shift_names, severity, cifar10c_root, cifar10_1_root, tuple(data.test.shape[1:]), num_classes
        )
    sets.update({name: x for name, (x, _) in given.items()})
    real = full.take(keep)
    return Setup(
        full=full,
        real=real,
        reserve=reserve,
        test=test,
        test_sets=sets,
        num_classes=num_classes,
        num_attrs=getattr(data, "num_attrs", 0) if attrs is not None else 0,
        aligned=getattr(data, "aligned", None),
        attribute_of=getattr(data, "attribute_of", None),
        sizes=class_sizes(real.labels, num_classes),
        test_labels={name: y for name, (_, y) in given.items()},
    )


def prepare_replicates(
    load: Callable[[int | None], Dataset],  # replicate s's data (None: the source's own train/test partition)
    seeds: list[int],
    *,
    seed: int,  # the data seed
    draw: str = "fixed",  # split.draw: fixed | per_replicate
    test: str = "fixed",  # split.test: fixed | per_replicate
    **options: Any,  # prepare's other keywords
) -> dict[int, Setup]:
    """Every replicate seed's Setup: one shared Setup when nothing is drawn per replicate (the data seed's);
    with draw=per_replicate replicate s splits, shifts and corrupts from its own data seed (seed, s); with
    test=per_replicate it also reads its own train/test partition through load(s). Released test sets are
    read once and shared (they are fixed files)."""
    if draw == "fixed" and test == "fixed":
        shared = prepare(load(None), seed=seed, **options)
        return {s: shared for s in seeds}
    given = None
    out = {}
    for s in seeds:
        data = load(s if test == "per_replicate" else None)
        if given is None:
            given = released.load_all(
                options["shift_names"], options["severity"], options.get("cifar10c_root"),
                options.get("cifar10_1_root"), tuple(data.test.shape[1:]), _num_classes(data),
            )  # fmt: skip
        data_seed = seeding.derive_seed(seed, "replicate-split", s) if draw == "per_replicate" else seed
        out[s] = prepare(data, seed=data_seed, given=given, **options)
    return out


def _num_classes(data: Dataset) -> int:
    """The classes of a labelled source (the contamination paths need train and test labels)."""
    if data.train_labels is None or data.test_labels is None:
        raise ContaminationError(
            "data: the contamination paths need a labelled source (train and test labels)"
        )
    return int(max(data.train_labels.max(), data.test_labels.max())) + 1


def pool_needs(cells: list[Cell], setups: dict[int, Setup] | list[int]) -> dict[tuple, list[int]]:
    """Per generator (generation, replicate), the generated images of each class its largest cell needs
    (class sizes: each cell's replicate's real split, or one list for all)."""
    need: dict[tuple, list[int]] = {}
    for c in cells:
        if c.kind == "contaminated" and c.mode != "control" and c.ratio > 0:
            sizes = setups if isinstance(setups, list) else setups[c.seed].sizes
            k = extra_per_class(c.mode, c.ratio, sizes)
            key = (c.gen_t, c.gen_seed)
            need[key] = [max(a, b) for a, b in zip(need.get(key, [0] * len(sizes)), k, strict=True)]
    return need


def check_reserve(cells: list[Cell], setups: dict[int, Setup]) -> None:
    """Refuse before any training when the held-out reserve lacks images some control cell needs."""
    for c in cells:
        if c.kind == "contaminated" and c.mode == "control":
            setup = setups[c.seed]
            have = class_sizes(setup.reserve.labels, setup.num_classes)
            need = extra_per_class(c.mode, c.ratio, setup.sizes)
            short = [y for y in range(setup.num_classes) if need[y] > have[y]]
            if short:
                y = short[0]
                raise ContaminationError(
                    f"modes.control: alpha {c.ratio:g} needs {need[y]} held-out real images of class {y}, "
                    f"the reserve holds {have[y]}; lower split.fraction (the classifier's share) or the alpha"
                )


def check_plan(run: RunDir, cells: list[Cell]) -> None:
    """Keep the grid's cell list in cells.json; refuse to resume when it changed (cell i must stay cell i).

    The config alone does not pin the grid: mode generations walks every committed generation of the loop
    run, which may have grown since.
    """
    plan_text = json.dumps([c.describe() for c in cells], indent=0)
    path = run.path / "cells.json"
    if path.exists() and path.read_text() != plan_text:
        raise RunError(
            f"run directory {run.path} holds another grid (cells.json differs: e.g. the loop run has more "
            "generations now); list generator.generations explicitly or use another run directory"
        )
    write_atomic(path, plan_text)


def evaluate(net: torch.nn.Module, setup: Setup) -> tuple[dict[str, float], torch.Tensor]:
    """Clean and shifted test accuracies (and their mean over shifts); returns the clean predictions too."""
    pred = classifiers.predict(net, setup.test.images)
    row = {"acc_clean": float((pred == setup.test.labels).double().mean())}
    for name, images in setup.test_sets.items():
        row[f"acc_{name}"] = classifiers.accuracy(net, images, setup.test_labels.get(name, setup.test.labels))
    if setup.test_sets:
        row["acc_shift_mean"] = sum(row[f"acc_{n}"] for n in setup.test_sets) / len(setup.test_sets)
    return row, pred


def generator_stats(pool: Pool, reference: torch.nn.Module, setup: Setup) -> dict[str, Any]:
    """What a real-trained classifier makes of generated images, and how their bias drifts from the real."""
    seen = classifiers.predict(reference, pool.images)
    row: dict[str, Any] = {"gen_ref_acc": float((seen == pool.labels).double().mean()), "gen_pool": len(pool)}
    if pool.attrs is not None and setup.full.attrs is not None and setup.aligned is not None:
        row.update(
            bias.generator_bias(
                pool.labels,
                pool.attrs,
                setup.full.labels,
                setup.full.attrs,
                setup.aligned,
                setup.num_classes,
                setup.num_attrs,
                seen_y=seen,
            )
        )
    else:
        seen_p = bias.proportions(seen, setup.num_classes)
        row["gen_class_props"] = seen_p.tolist()
        row["gen_class_tv"] = bias.total_variation(
            seen_p, bias.proportions(setup.full.labels, setup.num_classes)
        )
    return row


def run_grid(
    run: RunDir,  # contamination run directory (RunDir(path, key="cell")), locked and config-checked
    setups: dict[int, Setup] | Setup,  # the real data per replicate seed (prepare_replicates), or one for all
    cells: list[Cell],  # plan(...)
    source: GeneratorSource | None,  # generated images (None when no cell needs them)
    classifier: dict[str, Any],  # the main classifier: arch, steps and the training options
    classifier_seed: int | None = None,  # one seed for every classifier (None: each replicate's own seed)
    device: str = "cpu",
    save_models: bool = False,  # keep every cell's classifier (the reference's is always kept)
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every cell not yet committed in run; returns all rows."""
    if isinstance(setups, Setup):
        setups = {c.seed: setups for c in cells}
    needs = pool_needs(cells, setups)
    first = setups[cells[0].seed]  # the reference's replicate
    shape = tuple(first.test.images.shape[1:])
    check_reserve(cells, setups)
    check_plan(run, cells)
    done = run.repair()
    rows = run.rows()
    gen_rows: dict[tuple, dict[str, Any]] = {}  # generator statistics, once per pool
    reference = None

    def build(opts: dict[str, Any], gen: torch.Generator) -> torch.nn.Module:
        net_opts = {k: opts[k] for k in NET_KEYS if k in opts}
        return classifiers.make_classifier(
            opts["arch"], shape, first.num_classes, generator=gen, device=device, **net_opts
        )

    if done:  # the reference classifier of an interrupted grid
        reference = build(dict(classifier), torch.Generator().manual_seed(0))
        reference.load_state_dict(
            torch.load(run.gen_dir(0) / "model.pt", map_location=device, weights_only=True)
        )
    bar = tqdm(
        range(len(done), len(cells)), desc="cells", disable=not progress, initial=len(done), total=len(cells)
    )
    for i in bar:
        cell = cells[i]
        setup = setups[cell.seed]
        # this replicate's classifier-side streams (which images, initialisation, batches); the data seed and
        # the generator's seed are not among their roots, so each can be resampled alone
        stream = partial(
            seeding.generator, cell.seed if classifier_seed is None else classifier_seed, "classifier"
        )
        tmp = run.begin(i)
        clock = time.perf_counter()
        extra = order = None
        if cell.kind == "contaminated" and cell.ratio > 0:
            if cell.mode == "control":
                extra = setup.reserve
            else:
                extra = source.pool(cell.gen_t, cell.gen_seed, needs[cell.gen_t, cell.gen_seed])  # type: ignore[union-attr]
            key = "reserve" if cell.mode == "control" else f"pool-{cell.gen_t}-{cell.gen_seed}"
            order = class_orders(extra.labels, setup.num_classes, stream("extra", key))
        data = mix(
            cell.mode,
            cell.ratio,
            setup.real,
            class_orders(setup.real.labels, setup.num_classes, stream("replaced")),
            extra,
            order,
        )
        opts = {**classifier, **dict(cell.classifier)}
        net = build(opts, stream("init"))
        stats = classifiers.train_classifier(
            net,
            data.images,
            data.labels,
            steps=opts["steps"],
            generator=stream("fit"),
            progress=False,
            **{k: opts[k] for k in TRAIN_KEYS if k in opts},
        )
        row: dict[str, Any] = {
            "cell": i,
            "status": "ok",
            **cell.describe(),
            "arch": opts["arch"],
            "steps": opts["steps"],
            **{k: opts[k] for k in TRAIN_KEYS + NET_KEYS if k in opts},
            "n_train": len(data.labels),
            "n_real": data.count(REAL),
            "n_generated": data.count(GENERATED),
            "n_heldout": data.count(HELDOUT),
        }
        metrics, pred = evaluate(net, setup)
        row.update(metrics)
        if i == 0:
            reference = net
        if setup.test.attrs is not None and data.attrs is not None:
            row.update(
                bias.classifier_bias_vs_perfect(
                    setup.test.labels,
                    setup.test.attrs,
                    pred,
                    data.labels,
                    data.attrs,
                    setup.aligned,
                    setup.num_classes,
                    setup.num_attrs,
                )
            )
        if cell.kind == "contaminated" and cell.mode != "control" and cell.ratio > 0 and source is not None:
            gen_key = (cell.gen_t, cell.gen_seed)
            if gen_key not in gen_rows:
                pool = source.pool(cell.gen_t, cell.gen_seed, needs[gen_key])
                gen_rows[gen_key] = generator_stats(pool, reference, setup)  # type: ignore[arg-type]
            row.update(gen_rows[gen_key])
        row["train"] = stats
        row["seconds"] = time.perf_counter() - clock
        if i == 0 or save_models:
            (tmp / "model.pt").unlink(missing_ok=True)  # a new file: never written through a planted link
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp / "model.pt")
        run.commit(i, _clean(row), status="complete" if i == len(cells) - 1 else "running")
        rows.append(_clean(row))
        bar.set_postfix(acc=f"{row['acc_clean']:.3f}", mode=cell.mode, ratio=cell.ratio)
    return rows


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None (named in row["nonfinite"]), so results.jsonl is strict JSON."""
    return strict_row(row)
