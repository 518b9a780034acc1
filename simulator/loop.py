"""The generation loop: one function in four sections, fit / sample / evaluate / commit (docs/architecture.md,
"The generation loop").

    G_0 = fit(init, R)  or  load(checkpoint)
    for t in 1..T:
        D_t = policy(R, [S_0..S_{t-1}], t)
        G_t = fit(G_{t-1} if warm_start else init, D_t)
    after every generation: S_t = sample(G_t), row_t = evaluate(G_t, S_t), commit(t)

Its options come in four groups, one per section (`TrainOptions`, `SampleOptions`, `EvalOptions`,
`CommitOptions`); `from_config` builds each from its config section. How S_t is drawn and how D_t reads
S_0, S_1, ... back is the pool's (simulator.samples.SamplePool); with `TrainOptions.statistics` a
FitsStatistics family runs on sufficient statistics instead (StatisticsPool: model.path=statistics),
through the same four sections. What a family can do beyond the protocol it declares as a capability
(simulator.models.base), which the loop tests with isinstance.

Every draw comes from a generator named by (seed, generation, purpose), and a
generation is committed whole or not at all, so running the same command again
after any interruption resumes and ends with the same results. Inside a generation,
the fit checkpoint, the fitted model and whole sample shards survive an interruption
too (gen_XXX.tmp/): each is written with its checksum and checked before a resume uses
it (simulator.scratch); a file that fails is set aside and recomputed.

Under torch.distributed every rank runs this function: families with per-sample
seeds draw their samples sharded across ranks (simulator.samples), rank 0 alone
writes the run directory, and the other ranks read what it committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from simulator import distributed, scratch, seeding, step_log
from simulator import samples as store
from simulator.data.base import Dataset
from simulator.metrics import registry as metric_registry
from simulator.models.base import (
    Batched,
    Conditional,
    Diverged,
    Exportable,
    FitCheckpoint,
    FitsStatistics,
    GenerativeModel,
    IndexedSampling,
    ResumableFit,
)
from simulator.options import ConfigError, plain
from simulator.policies import Policy, PolicyError
from simulator.rundir import RunDir
from simulator.samples import SampleOptions, SamplePool, StatisticsPool
from simulator.shared_gen0 import SharedGen0
from simulator.strict_json import strict_row
from simulator.weights import load as load_weights
from simulator.weights import model_file, model_name

__all__ = ["CommitOptions", "EvalOptions", "SampleOptions", "TrainOptions", "from_config", "generation_loop"]

FIT, FIT_STATE, OPTIMIZER = "fit.json", "fit_state.pt", "optimizer.pt"  # in gen_XXX.tmp (and gen_XXX)
REDONE = ("samples.pt", "labels.pt", "params_star.pt", "chain_metrics.pt")  # made again by every life
Options = TypeVar("Options")


@dataclass(frozen=True)
class TrainOptions:
    """How each generation's model is fitted (the config's train section, and init's generation 0)."""

    warm_start: bool = True  # fine-tune G_{t-1} (Bertrand et al.) or refit from scratch
    steps: int | None = None  # training steps per generation (neural families)
    steps_gen0: int | None = None  # training steps of generation 0 (default: steps)
    epochs: float | None = None  # when set, steps per generation = ceil(epochs * rows / batch_size)
    images: int | None = None  # when set, steps per generation = ceil(images / batch_size), any lambda
    warmup: int | None = None  # learning-rate warm-up steps of every fit (None: the family's option)
    carry_optimizer: bool = False  # fine-tune with the optimizer state of generation t-1 (optimizer.pt)
    ema: str = "carry"  # the EMA of the weights across generations: "carry" or "restart"
    checkpoint_every: int | None = None  # save the fit's state every this many steps (resumable fits)
    checkpoint_minutes: float | None = None  # ... and every this many minutes
    init_checkpoint: str | None = None  # load G_0 from here instead of fitting it (pretrained start)
    init_pretrained: str | None = None  # G_0 is make_model()'s pretrained network as built (no fit)
    statistics: bool = False  # fit D_t's sufficient statistics, drawing no sample (model.path=statistics)
    logger: Callable[[int], Any] | None = None  # t -> the step logger of G_t's fit (step_log), or None
    after_fit: Callable[..., dict] | None = None  # a mitigation's post-fit step (simulator.mitigations)

    def steps_of(self, t: int, rows: int, model: Any) -> int | None:
        """Training steps of generation t's fit on `rows` rows: steps (steps_gen0 at t = 0), or a budget
        of images or epochs in the family's minibatches."""
        first = t == 0 and self.steps_gen0
        batch = model.batch_size if isinstance(model, Batched) else rows
        if self.images and not first:  # a fixed image budget, the same for every lambda
            return math.ceil(self.images / batch)
        if self.epochs and not first:  # about `epochs` passes over D_t (Bertrand et al.)
            return math.ceil(self.epochs * rows / batch)
        return self.steps_gen0 if first else self.steps


@dataclass(frozen=True)
class EvalOptions:
    """What each generation is measured by (the config's eval section)."""

    metrics: tuple[str, ...] = ()  # metric names from simulator.metrics.registry
    options: Mapping[str, Any] | None = None  # options passed to metrics (projections, k, ...)
    n_samples: int | None = None  # number of samples metrics see (default: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))  # a config's list, or a tuple


@dataclass(frozen=True)
class CommitOptions:
    """What a committed generation keeps besides its model and row, and what it shares."""

    save_samples: bool = True  # keep the samples per generation (else redrawn when read)
    shard_size: int | None = None  # samples per shard file of per-sample-seeded families (None: 5000)
    gen0_cache: Path | None = None  # share generation 0 with the sweep's other policies (SharedGen0)


def from_config(cls: type[Options], section: Any, **given: Any) -> Options:
    """cls (an options dataclass) from a config section: each field from the section's key of its name
    (a null takes the field's default), then `given`; the section's other keys are its other readers'."""
    values = {f.name: plain(section[f.name]) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if section is not None and f.name in section and section[f.name] is not None}  # fmt: skip
    return cls(**{**values, **given})


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _fitted(tmp: Path, corrupt: Path, t: int) -> dict[str, Any] | None:
    """The training stats of a fit finished before an interruption, when gen_XXX.tmp holds it whole:
    fit.json, the model and the optimizer state (where one was saved) matching their checksums. One that
    does not is set aside into corrupt/ with one warning line, and the generation is fitted again.

    Without a finished fit, everything but the fit checkpoint (which train() checks itself) is dropped: it
    came from the fit that is now done again (its model and optimizer state, when killed before fit.json;
    its samples, when killed while committing, after RunDir.commit removed fit.json). With one, the files
    every life writes anew (REDONE) are checked too, so that damage to them is reported, not papered over;
    sample shards are checked as they are resumed (samples.write_shards)."""
    then = f"fitting generation {t} again"
    stats = None
    if (tmp / FIT).exists() or (tmp / FIT).is_symlink():
        opt = tmp / OPTIMIZER  # written before fit.json, so its record says it must be there
        saved = opt.exists() or scratch.record_path(opt).exists()
        files = [tmp / FIT, model_file(tmp), *([opt] if saved else [])]
        if all(scratch.check(f, corrupt, then, required=True) for f in files):  # the first bad one ends it
            try:
                stats = json.loads((tmp / FIT).read_text())
                stats = {"train": stats["train"], "n_train": int(stats["n_train"])}
            except (ValueError, TypeError, KeyError):  # a checksummed fit.json of another version
                print(f"warning: {tmp.name}/{FIT} is unreadable; {scratch.set_aside(tmp / FIT, corrupt)} "
                      f"and {then}", file=sys.stderr)  # fmt: skip
                stats = None
    if stats is None:
        for path in tmp.iterdir():
            if path.name not in (FIT_STATE, scratch.PARTIAL):
                scratch.forget(path)
    else:  # never read back from gen_XXX.tmp, but a damaged one is still said (and then written anew)
        for name in REDONE:
            scratch.check(tmp / name, corrupt, "writing it again")
    return stats


def _aggregate(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Chain mean of each metric column over its finite chains; with several chains also its standard
    error (`_sem`) and the number of chains whose value was not finite (`_nonfinite`), so a collapse in
    some chains is counted, never averaged away (the verdict counts such a run as diverging)."""
    row: dict[str, float] = {}
    for name, v in values.items():
        v = v.detach().double().cpu().reshape(-1)
        finite = v[torch.isfinite(v)]
        row[name] = float(finite.mean()) if len(finite) else math.nan
        if v.numel() > 1:
            row[f"{name}_sem"] = float(finite.std() / math.sqrt(len(finite))) if len(finite) > 1 else math.nan
            row[f"{name}_nonfinite"] = int(v.numel() - len(finite))
    return row


def _pool(run: RunDir, data: Dataset, make_model: Callable[[], Any], model: Any, policy: Policy, seed: int,
          train: TrainOptions, sample: SampleOptions, evaluate: EvalOptions, commit: CommitOptions,
          n_draw: int, n_eval: int) -> SamplePool:  # fmt: skip
    """The run's pool: of samples, or of their statistics (train.statistics)."""
    if policy.n_truth(data.n_train) and data.truth is None:
        raise PolicyError(
            f"policy {policy.describe()}: the data source has no exact sampler (toy sources only)"
        )
    if not train.statistics:
        labelled = isinstance(model, Conditional) and model.num_classes is not None
        return SamplePool(run, data, make_model, policy, seed=seed, n_draw=n_draw, n_eval=n_eval,
                          options=sample, conditional=data.train_labels is not None and labelled,
                          indexed=isinstance(model, IndexedSampling), save=commit.save_samples,
                          shard_size=commit.shard_size)  # fmt: skip
    if commit.gen0_cache is not None or train.init_pretrained:
        raise ConfigError("model.path: statistics takes neither share_gen0 nor init.pretrained (generation 0 "
                          "costs nothing)")  # fmt: skip
    return StatisticsPool(run, data, make_model, policy, seed=seed, n_draw=n_draw, n_eval=n_eval,
                          options=sample, metrics=evaluate.metrics)  # fmt: skip


def _begin(run: RunDir, policy: Policy, gen0_cache: Path | None, n_draw: int) -> tuple[list[int], Any]:
    """The committed generations (rank 0 repairs the directory; every rank learns them) and, when generation
    0 is shared with the sweep's other policies and not yet committed here, the shared one's lock."""
    done = run.repair() if distributed.is_main() else None
    shared = None  # generation 0 shared by the sweep's policies: held (locked) until published
    if gen0_cache is not None and distributed.is_main() and not done:
        shared = SharedGen0(gen0_cache / f"n{n_draw}").acquire()  # the number of samples may differ
        if shared.ready():
            shared.adopt(run, policy.describe())
            shared.release()
            done, shared = [0], None
    distributed.barrier()
    return distributed.broadcast_object(done), shared


def _resumable(model: Any, train: TrainOptions, t: int, opt_state: Any, tmp: Path, corrupt: Path) -> dict:
    """fit()'s keywords for a ResumableFit: the carried optimizer, warm-up, EMA and checkpoint."""
    if not isinstance(model, ResumableFit):
        return {}
    carry = train.carry_optimizer and train.warm_start and t > 0
    seconds = train.checkpoint_minutes * 60 if train.checkpoint_minutes else None
    extra: dict[str, Any] = dict(optimizer_state=opt_state if carry else None, warmup=train.warmup,
                                 ema=train.ema if t > 0 and train.warm_start else "carry")  # fmt: skip
    if train.checkpoint_every or seconds:  # kept in gen_XXX.tmp until the commit
        extra["checkpoint"] = FitCheckpoint(tmp / FIT_STATE, train.checkpoint_every, seconds, corrupt)
    return extra


def _training_set(pool: SamplePool, policy: Policy, data: Dataset, t: int, gen: Callable) -> torch.Tensor:
    """D_t again, for the metrics that read the training set (entropy, memorisation): the policy's parts
    from the same stream, gathered by the pool (generation 0: the real set)."""
    parts = policy.select(t, data.n_train, data.train.shape[0], gen("policy")) if t > 0 else None
    return pool.training_set(t, parts)[0]


def generation_loop(
    run: RunDir,  # run directory, already locked and config-checked
    data: Dataset,  # real train (C or 1, n, *event), test, truth
    make_model: Callable[[], GenerativeModel],  # builds a fresh model of the family
    policy: Policy,  # which real and synthetic rows each generation trains on
    *,
    generations: int = 10,  # T: generations after generation 0
    seed: int = 0,  # root of every seed stream
    train: TrainOptions | None = None,  # how G_t is fitted (None: TrainOptions())
    sample: SampleOptions | None = None,  # how S_t is drawn
    evaluate: EvalOptions | None = None,  # what each generation is measured by
    commit: CommitOptions | None = None,  # what a committed generation keeps
    progress: bool = True,  # tqdm bars over generations and training steps
) -> list[dict[str, Any]]:
    """Run or resume generations 0..T in `run`; returns the results rows (as committed)."""
    # ---- Setup: sizes, the pool, what is committed already -----------------------------------------------
    train, sample = train or TrainOptions(), sample or SampleOptions()
    evaluate, commit = evaluate or EvalOptions(), commit or CommitOptions()
    n_pool = policy.pool_size(data.n_train)  # samples per generation that enter training sets
    metrics = evaluate.metrics
    n_draw = max(n_pool, sample.n or 0, (evaluate.n_samples or 0) if metrics else 0, 1)
    n_eval = min(evaluate.n_samples or n_draw, n_draw)
    model = make_model()
    pool = _pool(run, data, make_model, model, policy, seed, train, sample, evaluate, commit, n_draw, n_eval)
    main, corrupt, chains = distributed.is_main(), run.path / "corrupt", data.train.shape[0]
    done, shared = _begin(run, policy, commit.gen0_cache, n_draw)
    rows = run.rows()
    if rows and rows[-1].get("status") == "diverged":
        return rows
    params0 = params_star = None  # parameters of G_0 and of the fit to real data (theta*)
    opt_state = None  # optimizer state of the last fit (carry_optimizer)
    if done:  # repair() has checked every committed file against its checksum
        pool.restore(model, run.gen_dir(done[-1]))
        first = make_model()
        pool.restore(first, run.gen_dir(0))
        params0 = first.parameters_vector()
        star = run.gen_dir(0) / "params_star.pt"
        params_star = _load(star) if star.exists() else params0
    bar = tqdm(range(len(done), generations + 1), desc="generations", disable=not progress,
               initial=len(done), total=generations + 1)  # fmt: skip
    for t in bar:
        gen = partial(seeding.generator, seed, t)  # gen(purpose): this generation's stream
        tmp = run.begin(t)  # may hold this generation's fitted model and sample shards (a resume)
        row: dict[str, Any] = {"generation": t, "status": "ok", "policy": policy.describe()}

        # ---- Fit: G_t on D_t (G_0 on the real set, or loaded), or found finished in gen_XXX.tmp -------
        clock = time.perf_counter()
        fitted = distributed.broadcast_object(_fitted(tmp, corrupt, t) if main else None)
        try:
            if fitted is not None:  # fitted before an interruption: the model waits in gen_XXX.tmp
                pool.restore(model, tmp)
                stats, n_train = fitted["train"], fitted["n_train"]
            elif t == 0 and train.init_checkpoint:
                pool.set_state(model, load_weights(Path(train.init_checkpoint)))
                stats, n_train = pool.loaded(train.init_checkpoint), 0
            elif t == 0 and train.init_pretrained:  # make_model built G_0 from the diffusers directory itself
                stats, n_train = {"loaded": str(train.init_pretrained)}, 0
            else:
                if t == 0 or not train.warm_start:
                    model.reset(gen("init"))
                parts = policy.select(t, data.n_train, chains, gen("policy")) if t > 0 else None
                d_t, labels, n_train = pool.training_set(t, parts)  # generation 0: the real set
                weights = policy.weights(parts, pool.sizes(t)) if parts else None  # per row (weight_real)
                carry = isinstance(model, ResumableFit) and train.carry_optimizer and train.warm_start
                if carry and t > 0 and opt_state is None and (run.gen_dir(t - 1) / OPTIMIZER).exists():
                    opt_state = _load(run.gen_dir(t - 1) / OPTIMIZER)  # after a resume
                extra = _resumable(model, train, t, opt_state, tmp, corrupt)
                if weights is not None:
                    extra["weights"] = weights
                logger = train.logger(t) if train.logger is not None and main else None
                with step_log.logging_to(logger):  # logger=tensorboard: per-step scalars, nothing else
                    stats = pool.fit(model, d_t, labels, steps=train.steps_of(t, n_train, model),
                                     generator=gen("fit"), progress=progress, **extra)  # fmt: skip
                if carry and isinstance(model, ResumableFit):
                    opt_state = model.optimizer_state
                    if main:  # before fit.json: a finished fit always has its optimizer state beside it
                        store.save_atomic(opt_state, tmp / OPTIMIZER, run.durable)
                del d_t, labels
            if fitted is None and train.after_fit is not None:  # Neon's merge, SIMS' auxiliary model
                stats = {**stats, **train.after_fit(model, t, make_model=make_model, pool=pool, seed=seed)}
        except Diverged as e:
            row.update(status="diverged", error=str(e))
            if main:
                run.commit(t, row, status="diverged")
            rows.append(strict_row(row))  # as committed: non-finite values are None
            break
        row.update(n_train=n_train, train=stats, seconds_fit=time.perf_counter() - clock)
        if main and fitted is None:  # the model first, then the marker that says the fit is done
            state = model.state_dict()  # model.safetensors (a plain tensor dict), else model.pt
            store.save_atomic(state, tmp / model_name(state), run.durable)
            if not train.statistics:  # a fit from statistics costs less than checking its files: redone
                scratch.write_text(json.dumps({"train": stats, "n_train": n_train}), tmp / FIT, run.durable)

        # ---- Sample: S_t (its first n_eval rows are what the metrics see) ---------------------------------
        clock = time.perf_counter()
        seen = pool.generate(model, t, tmp, metrics=bool(metrics), write=main, durable=run.durable,
                             corrupt=corrupt)  # fmt: skip
        pool.release(t)
        row["seconds_sample"] = time.perf_counter() - clock

        # ---- Evaluate: the metrics of G_t and S_t ----------------------------------------------------------
        clock = time.perf_counter()
        if t == 0 and model.parameters_vector() is not None:
            params0 = params_star = model.parameters_vector().detach().cpu()
            if train.init_checkpoint and metric_registry.reference_fit(metrics):  # theta*: fit to real data
                ref = make_model()
                ref.reset(gen("init"))
                real, _, _ = pool.training_set(0, None)
                pool.fit(ref, real, None, steps=train.steps_gen0 or train.steps, generator=gen("fit"),
                         progress=False)  # fmt: skip
                params_star = ref.parameters_vector().detach().cpu()
                if main:
                    store.save_atomic(params_star, tmp / "params_star.pt", run.durable)
        with torch.no_grad():
            if train.statistics and isinstance(model, FitsStatistics):  # G_t's parameters, S_t's statistics
                values = model.metrics_from_statistics(metrics, seen, data, params0, params_star)
            else:
                ctx = metric_registry.MetricContext(
                    model=model, samples=seen, data=data, generation=t, generator=gen("metrics"),
                    params0=params0, params_star=params_star, options=dict(evaluate.options or {}),
                    training_set=None if n_train == 0 else partial(_training_set, pool, policy, data, t, gen),
                )  # fmt: skip
                values = {}
                for name in metrics:
                    values.update(metric_registry.get(name)(ctx))
        row.update(_aggregate(values))
        row["seconds_eval"] = time.perf_counter() - clock

        # ---- Commit: gen_XXX.tmp becomes gen_XXX, whole or not at all -------------------------------------
        if main:
            if isinstance(model, Exportable):  # e.g. a diffusers pipeline directory (export_pipeline)
                model.export(tmp)
            pool.finish(model, t, tmp, seen, durable=run.durable)  # the grid, statistics.pt, unsaved shards
            if chains > 1 and values:
                chain = {k: v.detach().cpu() for k, v in values.items()}
                store.save_atomic(chain, tmp / "chain_metrics.pt", run.durable)
            run.commit(t, row, status="complete" if t == generations else "running")
            if t == 0 and shared is not None:
                shared.publish(run)
        if shared is not None:
            shared.release()
            shared = None
        distributed.barrier()  # the other ranks read the committed generation from here on
        del seen
        rows.append(strict_row(row))  # as committed: non-finite values are None
        bar.set_postfix({k: f"{row[k]:.3g}" for k in list(values)[:2]})
    if shared is not None:  # generation 0 diverged: nothing to share
        shared.release()
    return rows
