"""The generation loop: one flat function (docs/architecture.md, "The generation loop").

    G_0 = fit(init, R)  or  load(checkpoint)
    for t in 1..T:
        D_t = policy(R, [S_0..S_{t-1}], t)
        G_t = fit(G_{t-1} if warm_start else init, D_t)
    after every generation: S_t = sample(G_t), row_t = evaluate(G_t, S_t), commit(t)

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

import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from simulator import distributed, scratch, seeding, step_log
from simulator import samples as store
from simulator.curation import Reward, soft_select
from simulator.data.base import Dataset
from simulator.metrics import registry as metric_registry
from simulator.models.base import Diverged, FitCheckpoint, GenerativeModel
from simulator.policies import REAL, TRUTH, Policy, PolicyError, assemble, curate, draw_truth
from simulator.report import save_grid
from simulator.rundir import RunDir
from simulator.shared_gen0 import SharedGen0
from simulator.strict_json import strict_row
from simulator.weights import load as load_weights
from simulator.weights import load_model, model_file, model_name

FIT, FIT_STATE, OPTIMIZER = "fit.json", "fit_state.pt", "optimizer.pt"  # in gen_XXX.tmp (and gen_XXX)
REDONE = ("samples.pt", "labels.pt", "params_star.pt", "chain_metrics.pt")  # made again by every life


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


def generation_loop(
    run: RunDir,  # run directory, already locked and config-checked
    data: Dataset,  # real train (C or 1, n, *event), test, truth
    make_model: Callable[[], GenerativeModel],  # builds a fresh model of the family
    policy: Policy,  # which real and synthetic rows each generation trains on
    generations: int = 10,  # T: generations after generation 0
    seed: int = 0,  # root of every seed stream
    warm_start: bool = True,  # fine-tune G_{t-1} (Bertrand et al.) or refit from scratch
    steps: int | None = None,  # training steps per generation (neural families)
    steps_gen0: int | None = None,  # training steps of generation 0 (default: steps)
    epochs: float | None = None,  # when set, steps per generation = ceil(epochs * rows / batch_size)
    images: int | None = None,  # when set, steps per generation = ceil(images / batch_size), any lambda
    warmup: int | None = None,  # learning-rate warm-up steps of every fit (None: the family's option)
    carry_optimizer: bool = False,  # fine-tune with the optimizer state of generation t-1 (optimizer.pt)
    ema: str = "carry",  # the EMA of the weights across generations: "carry" or "restart"
    checkpoint_every: int | None = None,  # save the fit's state every this many steps (resumable fits)
    checkpoint_minutes: float | None = None,  # ... and every this many minutes
    init_checkpoint: str | None = None,  # load G_0 from here instead of fitting it (pretrained start)
    init_pretrained: str | None = None,  # G_0 is make_model()'s pretrained network as built (no fit)
    n_samples: int | None = None,  # samples per generation (default: what the policy needs)
    temperature: float = 1.0,  # sampling bias s: s < 1 narrows the samples
    guidance: float | None = None,  # classifier-free guidance weight w (class-conditional diffusion)
    curation_k: int = 1,  # keep the best of k candidates per sample (1: no curation)
    curation_reward: str | Reward = "model",  # "model"/"truth" (log-density), or reward(m, x, y) -> (C, m)
    curation_beta: float | None = None,  # None: best of k; else keep candidate i w.p. softmax(beta r)_i
    save_samples: bool = True,  # keep the samples per generation (else regenerated on resume)
    shard_size: int | None = None,  # samples per shard file of per-sample-seeded families (None: 5000)
    gen0_cache: Path | None = None,  # share generation 0 with the sweep's other policies (SharedGen0)
    metrics: tuple[str, ...] = (),  # metric names from simulator.metrics.registry
    metric_options: dict | None = None,  # options passed to metrics (projections, k, ...)
    eval_samples: int | None = None,  # number of samples metrics see (default: all)
    progress: bool = True,  # tqdm bars over generations and training steps
    step_logger: Callable[[int], step_log.StepLogger | None] | None = None,  # t -> logger of G_t's fit
) -> list[dict[str, Any]]:
    """Run or resume generations 0..T in `run`; returns the results rows."""
    chains = data.train.shape[0]
    n_real = data.n_train
    n_pool = policy.pool_size(n_real)  # samples per generation that enter training sets
    n_draw = max(n_pool, n_samples or 0, (eval_samples or 0) if metrics else 0, 1)
    n_eval = min(eval_samples or n_draw, n_draw)
    per_shard = shard_size or store.DEFAULT_SHARD_SIZE
    model = make_model()
    conditional = data.train_labels is not None and getattr(model, "num_classes", None) is not None
    sharded = bool(getattr(model, "per_sample_seeds", False))  # samples drawn by index, in shards
    main = distributed.is_main()  # rank 0 writes the run directory
    corrupt = run.path / "corrupt"  # where files that fail their checksums are set aside (RunDir.repair)
    held: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # samples not on disk (toy, unsaved)
    bias = {"temperature": temperature, **({"guidance": guidance} if guidance else {})}  # sample() options

    def class_labels(t: int, n: int) -> torch.Tensor | None:
        """Classes of the n candidates of S_t, in the proportions of the real training set."""
        if not conditional:
            return None
        real = data.train_labels[0]
        return real[torch.randint(len(real), (n,), generator=seeding.generator(seed, t, "labels"))]

    def keep_best(
        m: GenerativeModel, x: torch.Tensor, y: torch.Tensor | None, t: int, rows: list[int] | slice
    ):
        """Curation: one of each k consecutive candidates (samples `rows` of S_t), the best by the reward
        or, with curation_beta, one drawn with probability softmax(beta * reward) (simulator.curation)."""
        if callable(curation_reward):
            reward = curation_reward(m, x, y)
        else:
            reward = m.log_prob(x) if curation_reward == "model" else data.truth.log_prob(x)
        if curation_beta is None:
            keep = curate(reward.cpu(), curation_k)
        else:  # one uniform per sample of S_t, whichever rank draws it
            u = torch.rand(
                x.shape[0], n_draw, generator=seeding.generator(seed, t, "curation"), dtype=torch.float64
            )
            keep = soft_select(reward.cpu(), curation_k, curation_beta, u[:, rows])
        return x[torch.arange(x.shape[0]).unsqueeze(1), keep], None if y is None else y[keep[0]]

    def draw(m: GenerativeModel, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S_t: n_draw samples of m (with their class labels for a class-conditional family)."""
        g = seeding.generator(seed, t, "sample")
        y = class_labels(t, n_draw * curation_k)
        x = m.sample(n_draw * curation_k, y, generator=g, **bias).cpu()
        if curation_k > 1:
            x, y = keep_best(m, x, y, t, slice(None))
        return x, None if y is None else y.unsqueeze(0).expand(x.shape[0], -1)

    def draw_rows(m: GenerativeModel, t: int, rows: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `rows` of S_t (equal to draw(m, t)[:, rows]) for a per-sample-seeded family; each rank
        draws its round-robin part (with its curation candidates) and the parts are gathered."""
        k, mine = curation_k, [rows[i] for i in distributed.shard(len(rows))]
        candidates = [i * k + j for i in mine for j in range(k)]
        y_all = class_labels(t, n_draw * k)
        x = m.sample(n_draw * k, y_all, generator=seeding.generator(seed, t, "sample"),  # type: ignore[call-arg]
                     indices=candidates, **bias).cpu()  # fmt: skip
        y = None if y_all is None else y_all[candidates]
        if k > 1:
            x, y = keep_best(m, x, y, t, mine)
        x = store.gather_rows(x, len(rows))
        y = None if y is None else distributed.gather_shards(y, len(rows))
        return x, None if y is None else y.unsqueeze(0).expand(x.shape[0], -1)

    def samples_of(t: int, rows: int | None = None, kind: str = store.SAMPLES) -> torch.Tensor:
        """The first `rows` samples (or labels) of S_t: from disk when saved, else kept or redrawn."""
        if t not in held and store.exists(run.gen_dir(t)):
            return store.load(run.gen_dir(t), rows, kind)
        if t not in held:  # sample.save=false: regenerate them exactly from the saved model
            m = make_model()
            m.load_state_dict(load_model(run.gen_dir(t)))
            held[t] = draw_rows(m, t, range(n_draw)) if sharded else draw(m, t)
        x = held[t][0 if kind == store.SAMPLES else 1]
        return x if rows is None else x[:, :rows]

    n_truth = policy.n_truth(n_real)  # rows drawn afresh from the exact sampler each generation
    if n_truth and data.truth is None:
        raise PolicyError(
            f"policy {policy.describe()}: the data source has no exact sampler (toy sources only)"
        )

    def pool(member: int) -> torch.Tensor:
        if member == TRUTH:  # generation t's fresh real rows (t: the generation being assembled)
            return draw_truth(data.truth, n_truth, chains, seed, t)
        return data.train if member == REAL else samples_of(member, n_pool)

    def pool_labels(member: int) -> torch.Tensor:
        return data.train_labels if member == REAL else samples_of(member, n_pool, store.LABELS)

    done = run.repair() if main else None
    shared = None  # generation 0 shared by the sweep's policies: held (locked) until published
    if gen0_cache is not None and main and not done:
        shared = SharedGen0(gen0_cache / f"n{n_draw}").acquire()  # the number of samples may differ
        if shared.ready():
            shared.adopt(run, policy.describe())
            shared.release()
            done, shared = [0], None
    distributed.barrier()
    done = distributed.broadcast_object(done)
    rows = run.rows()
    if rows and rows[-1].get("status") == "diverged":
        return rows
    params0 = params_star = None  # parameters of G_0 and of the fit to real data (theta*)
    opt_state = None  # optimizer state of the last fit (carry_optimizer)
    if done:  # repair() has checked every committed file against its checksum
        model.load_state_dict(load_model(run.gen_dir(done[-1])))
        first = make_model()
        first.load_state_dict(load_model(run.gen_dir(0)))
        params0 = first.parameters_vector()
        star = run.gen_dir(0) / "params_star.pt"
        params_star = _load(star) if star.exists() else params0
    bar = tqdm(range(len(done), generations + 1), desc="generations", disable=not progress,
               initial=len(done), total=generations + 1)  # fmt: skip
    for t in bar:
        gen = partial(seeding.generator, seed, t)  # gen(purpose): this generation's stream
        tmp = run.begin(t)  # may hold this generation's fitted model and sample shards (a resume)
        row: dict[str, Any] = {"generation": t, "status": "ok", "policy": policy.describe()}
        clock = time.perf_counter()
        fitted = distributed.broadcast_object(_fitted(tmp, corrupt, t) if main else None)
        try:
            if fitted is not None:  # fitted before an interruption: the model waits in gen_XXX.tmp
                model.load_state_dict(load_model(tmp))
                stats, n_train = fitted["train"], fitted["n_train"]
            elif t == 0 and init_checkpoint:
                model.load_state_dict(load_weights(Path(init_checkpoint)))
                stats, n_train = {"loaded": str(init_checkpoint)}, 0
            elif t == 0 and init_pretrained:  # make_model built G_0 from the diffusers directory itself
                stats, n_train = {"loaded": str(init_pretrained)}, 0
            else:
                if t == 0 or not warm_start:
                    model.reset(gen("init"))
                train, labels = data.train, data.train_labels if conditional else None
                weights = None  # per-row weights (policy weight_real); generation 0 is unweighted
                if t > 0:
                    parts = policy.select(t, n_real, chains, gen("policy"))
                    sizes = {REAL: n_real, TRUTH: n_truth, **dict.fromkeys(range(t), n_pool)}  # rows of each
                    train = assemble(parts, pool, chains, sizes)
                    labels = assemble(parts, pool_labels, chains, sizes) if conditional else None
                    weights = policy.weights(parts, sizes)
                n_train = train.shape[1]
                n_steps = steps_gen0 if t == 0 and steps_gen0 else steps
                batch = getattr(model, "batch_size", n_train)
                if images and not (t == 0 and steps_gen0):  # a fixed image budget, the same for every lambda
                    n_steps = math.ceil(images / batch)
                elif epochs and not (t == 0 and steps_gen0):  # about `epochs` passes over D_t (Bertrand)
                    n_steps = math.ceil(epochs * n_train / batch)
                extra: dict[str, Any] = {}
                if getattr(model, "resumable_fit", False):
                    carry = carry_optimizer and warm_start and t > 0
                    if carry and opt_state is None and (run.gen_dir(t - 1) / "optimizer.pt").exists():
                        opt_state = _load(run.gen_dir(t - 1) / "optimizer.pt")  # after a resume
                    seconds = checkpoint_minutes * 60 if checkpoint_minutes else None
                    extra = dict(optimizer_state=opt_state if carry else None, warmup=warmup,
                                 ema=ema if t > 0 and warm_start else "carry")  # fmt: skip
                    if checkpoint_every or seconds:  # kept in gen_XXX.tmp until the commit
                        extra["checkpoint"] = FitCheckpoint(tmp / FIT_STATE, checkpoint_every, seconds,
                                                            corrupt)  # fmt: skip
                if weights is not None:
                    extra["weights"] = weights
                logger = step_logger(t) if step_logger is not None and main else None
                with step_log.logging_to(logger):  # logger=tensorboard: per-step scalars, nothing else
                    stats = model.fit(
                        train, labels, steps=n_steps, generator=gen("fit"), progress=progress, **extra
                    )
                if getattr(model, "resumable_fit", False) and carry_optimizer and warm_start:
                    opt_state = model.optimizer_state  # type: ignore[attr-defined]  # resumable_fit
                    if main:  # before fit.json: a finished fit always has its optimizer state beside it
                        store.save_atomic(opt_state, tmp / OPTIMIZER, run.durable)
                del train, labels
        except Diverged as e:
            row.update(status="diverged", error=str(e))
            if main:
                run.commit(t, row, status="diverged")
            rows.append(strict_row(row))  # as committed: non-finite values are None
            break
        row["n_train"] = n_train
        row["train"] = stats
        row["seconds_fit"] = time.perf_counter() - clock
        if main and fitted is None:  # the model first, then the marker that says the fit is done
            state = model.state_dict()  # model.safetensors (a plain tensor dict), else model.pt
            store.save_atomic(state, tmp / model_name(state), run.durable)
            scratch.write_text(json.dumps({"train": stats, "n_train": n_train}), tmp / FIT, run.durable)

        clock = time.perf_counter()
        if sharded:  # resumable shards in gen_XXX.tmp, each drawn across the ranks
            make = partial(draw_rows, model, t)
            store.write_shards(tmp, n_draw, per_shard, make, write=main, durable=run.durable, corrupt=corrupt)
            distributed.barrier()  # the other ranks read what rank 0 wrote
            samples = store.load(tmp, n_eval if metrics else min(n_eval, 64))  # metrics or the grid
        else:  # cheap (toy) families: one draw on every rank
            held[t] = draw(model, t)
            samples = held[t][0][:, :n_eval]
            if main and save_samples:  # drawn again by every life that gets here: never read from tmp
                store.save_atomic(held[t][0], tmp / "samples.pt", run.durable)
                if held[t][1] is not None:
                    store.save_atomic(held[t][1], tmp / "labels.pt", run.durable)
        for old in [g for g in held if g not in policy.needs(t + 1) or (save_samples and g < t)]:
            del held[old]  # saved samples are read back from disk, unsaved ones kept while needed
        row["seconds_sample"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if t == 0 and model.parameters_vector() is not None:
            params0 = params_star = model.parameters_vector().detach().cpu()
            if init_checkpoint and "param_dist" in metrics:  # theta*: the fit to real data (Bertrand)
                ref = make_model()
                ref.reset(gen("init"))
                ref.fit(data.train, steps=steps_gen0 or steps, generator=gen("fit"), progress=False)
                params_star = ref.parameters_vector().detach().cpu()
                if main:
                    store.save_atomic(params_star, tmp / "params_star.pt", run.durable)
        ctx = metric_registry.MetricContext(
            model=model, samples=samples, data=data,
            generation=t, generator=gen("metrics"), params0=params0, params_star=params_star,
            options=dict(metric_options or {}),
        )  # fmt: skip
        values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in metrics:
                values.update(metric_registry.get(name)(ctx))
        row.update(_aggregate(values))
        row["seconds_eval"] = time.perf_counter() - clock

        if main:
            if hasattr(model, "export"):  # e.g. a diffusers pipeline directory (export_pipeline)
                model.export(tmp)
            if sharded and not save_samples:
                store.remove(tmp)  # redrawn from the model file when a later generation needs them
            if samples.dim() == 5:  # images (C, n, ch, h, w): a sample grid per generation
                save_grid(samples[0, :64], tmp / "samples.png")
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
        del samples
        rows.append(strict_row(row))  # as committed: non-finite values are None
        bar.set_postfix({k: f"{row[k]:.3g}" for k in list(values)[:2]})
    if shared is not None:  # generation 0 diverged: nothing to share
        shared.release()
    return rows
