"""The training loop: set up, resume or init, step, log, evaluate, checkpoint, sample.

``train(config, workdir)`` is the single entry point used by the CLI, tests and notebooks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain import config as config_lib
from lmtrain import host_devices
from lmtrain.data import finetune_data, pipeline
from lmtrain.data.text_file import prepare_text_file
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.distributed import maybe_initialize
from lmtrain.errors import ConfigError, DataError
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import compile_cache, divergence, finetune, rollout, run_guard
from lmtrain.train import flops as flops_lib
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.compile_ahead import CompileAhead, global_spec, with_shardings
from lmtrain.train.early_stop import EvalHooks
from lmtrain.train.lora_io import save_adapters
from lmtrain.train.losses.dpo import DegenerateRunMonitor
from lmtrain.train.metrics_log import MetricsLogger
from lmtrain.train.optim import make_optimizer, warmup_note
from lmtrain.train.prefetch import Prefetcher
from lmtrain.train.preflight import run_preflight
from lmtrain.train.run_info import write_run_files
from lmtrain.train.signals import PreemptionGuard, TrainingInterrupted
from lmtrain.train.state import init_state, state_shardings
from lmtrain.train.step import make_eval_step, make_train_step, stacked_shardings


@dataclasses.dataclass
class Setup:
    """Everything built from a config, shared by train, eval and generate."""

    config: object
    mesh: object
    model: Transformer
    model_cfg: ModelConfig
    tokenizer: object
    data_dir: str
    tx: object
    schedule: object
    abstract_state: object
    shardings: object
    batch_sharding: NamedSharding
    params_transform: object = None  # LoRA / reward head (lmtrain/train/finetune.py)
    eval_rows: dict | None = None  # fine-tuning records runs: the eval file's rows
    eval_fit: object = None  # and its FitStats (what fitting seq_len cut and dropped)


def resolve_data(config, workdir: str) -> str:
    if config.data.path:
        return_dir = os.path.join(workdir, "data")
        if jax.process_index() == 0:
            prepare_text_file(
                config.data.path,
                return_dir,
                tokenizer=config.data.tokenizer,
                val_fraction=config.data.val_fraction,
            )
        if jax.process_count() > 1:  # the other processes read what process 0 just wrote
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lmtrain: text file prepared")
        return return_dir
    if not os.path.isdir(config.data.dir):
        raise DataError(
            f"config.data.dir={config.data.dir!r} does not exist; run `lmtrain data prepare` first "
            "or point config.data.dir at its output"
        )
    return config.data.dir


def build(config, workdir: str) -> Setup:
    maybe_initialize(config.distributed)
    finetune.adopt_init_from_model(config)
    config_lib.validate(config, jax.device_count())
    if finetune.uses_records(config):  # fine-tuning records: the run keeps its tokenizer itself
        tokenizer, data_dir = finetune.records_tokenizer(config), workdir
        if jax.process_index() == 0:
            tokenizer.save(os.path.join(workdir, "tokenizer"))
    else:
        data_dir = resolve_data(config, workdir)
        tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    if config.init_from:
        finetune.check_same_vocabulary(
            config.init_from, tokenizer, config.model.vocab_size, "config.init_from"
        )
    if config.model.vocab_size == 0:
        with config.unlocked():
            config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ({data_dir}/tokenizer); set it to 0 to follow the tokenizer"
        )
    devices = jax.devices()[: config.mesh.num_devices or None]
    mesh, model_cfg, model, tx, schedule, transform, abstract, shardings, batch_sharding = (
        build_layout(config, devices)
    )
    eval_rows = eval_fit = None
    if finetune.uses_records(config) and config.data.eval_file and not rollout.is_rl(config):
        eval_rows, eval_fit = finetune_data.rows_and_fit(config, tokenizer, config.data.eval_file)
    return Setup(
        config,
        mesh,
        model,
        model_cfg,
        tokenizer,
        data_dir,
        tx,
        schedule,
        abstract,
        shardings,
        batch_sharding,
        transform,
        eval_rows,
        eval_fit,
    )


def build_layout(config, devices) -> tuple:
    """Mesh, model, optimizer and the state's abstract shapes and shardings over ``devices``
    (real ones, or a TPU topology's abstract devices for ``lmtrain compile``): (mesh, model_cfg,
    model, tx, schedule, params_transform, abstract_state, state_shardings, batch_sharding)."""
    mesh = make_mesh(config.mesh.shape, devices)
    model_cfg = ModelConfig.from_config(config.model)
    model = Transformer(model_cfg)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    transform = finetune.params_transform(config, model_cfg)
    abstract, shardings = state_shardings(
        model, tx, config.data.seq_len, config.seed, mesh, transform
    )
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return mesh, model_cfg, model, tx, schedule, transform, abstract, shardings, batch_sharding


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Host batch → global arrays sharded over (data, fsdp); each process passes its own rows."""
    if jax.process_count() == 1:  # one transfer call for the whole dict (cheaper per step)
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def eval_rows_per_process(cfg) -> int:
    """This process's rows of an eval batch (``train.eval_batch_size``, default the train batch)."""
    return (cfg.train.eval_batch_size or cfg.train.global_batch_size) // jax.process_count()


def _sum_results(outs: list[dict]) -> dict[str, float]:
    """Per-batch eval sums → totals, in float64 on the host (one device-to-host transfer)."""
    sums: dict[str, float] = {}
    for out in jax.device_get(outs):
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return sums


def evaluate(setup: Setup, eval_step, params, max_batches: int = 0, frozen=None) -> dict:
    cfg = setup.config
    if setup.eval_rows is not None:
        return evaluate_rows(setup, eval_step, params, max_batches, frozen)
    split_dir = os.path.join(setup.data_dir, cfg.data.eval_split)
    per_process = eval_rows_per_process(cfg)
    outs = []  # device results, fetched once at the end: dispatch never waits for the host
    for batch in pipeline.eval_batches(
        split_dir,
        seq_len=cfg.data.seq_len,
        batch_size=per_process,
        max_batches=max_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        outs.append(eval_step(params, to_global(batch, setup.batch_sharding)))
    sums = _sum_results(outs)
    weight = max(sums.get("weight", 0.0), 1.0)
    result = {
        "eval/loss": sums.get("loss_sum", 0.0) / weight,
        "eval/tokens": sums.get("weight", 0.0),
    }
    if "nll_sum" in sums:
        result["eval/perplexity"] = float(np.exp(sums["nll_sum"] / weight))
    return result


def evaluate_rows(setup: Setup, eval_step, params, max_batches: int = 0, frozen=None) -> dict:
    """Eval over a fine-tuning eval file: loss and every metric averaged over its full weight."""
    cfg = setup.config
    outs = []
    for batch in finetune_data.eval_batches(
        setup.eval_rows,
        batch_size=eval_rows_per_process(cfg),
        max_batches=max_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        outs.append(eval_step(params, to_global(batch, setup.batch_sharding), frozen))
    sums = _sum_results(outs)
    weight = max(sums.pop("weight", 0.0), 1.0)
    result = {"eval/loss": sums.pop("loss_sum", 0.0) / weight, "eval/weight": weight}
    result.update({f"eval/{k.removesuffix('_sum')}": v / weight for k, v in sums.items()})
    if "eval/nll" in result:
        result["eval/perplexity"] = float(np.exp(result["eval/nll"]))
    return result


def _token_dataset(cfg, setup: Setup):
    return pipeline.train_dataset(
        os.path.join(setup.data_dir, cfg.data.train_split),
        seq_len=cfg.data.seq_len,
        batch_size=cfg.train.global_batch_size // jax.process_count(),
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _step_functions(setup: Setup, frozen_shardings, extras):
    cfg, mesh = setup.config, setup.mesh
    train_step = make_train_step(
        setup.model,
        setup.schedule,
        cfg,
        mesh,
        setup.shardings,
        setup.batch_sharding,
        frozen_shardings,
        extras,
    )
    eval_step = make_eval_step(
        setup.model,
        cfg,
        mesh,
        setup.shardings.params,
        setup.batch_sharding,
        frozen_shardings,
        extras,
    )
    return train_step, eval_step


def _dispatch_group(cfg) -> int:
    """``train.steps_per_dispatch``: the steps one call runs where ``dispatch_size`` allows."""
    return max(int(cfg.train.get("steps_per_dispatch", 1)), 1)


def _compiles_ahead(cfg) -> bool:
    """Token-shard pretraining in one process (no frozen trees, batches known up front)."""
    return (
        cfg.train.get("compile_ahead", True)
        and jax.process_count() == 1
        and not finetune.uses_records(cfg)
        and not finetune.lora_enabled(cfg)
        and cfg.objective == "lm"
    )


def _start_compiles(ahead: CompileAhead, setup: Setup, train_step, eval_step, ds, start: int):
    """In threads: the first dispatch's train call (one step or a stack), the eval step and the
    end-of-run sampler (only process 0 samples)."""
    cfg = setup.config
    if start >= cfg.train.steps:
        return
    # dispatch_size never groups steps across a curriculum length change: one shape for all n
    n = dispatch_size(start, _dispatch_group(cfg), cfg)
    example = ds[0]  # random access: the iterator the loop reads from is untouched
    first = pipeline.curriculum_batch(example, start, cfg.data)
    batch = global_spec(first, setup.batch_sharding, jax.process_count())
    state = with_shardings(setup.abstract_state, setup.shardings)
    ahead.start("train_step", lambda: train_step.compile_for(state, batch, None, n))
    rows = eval_rows_per_process(cfg)  # evals read full-length windows, as the train split's
    eval_rows = {
        k: np.zeros((rows, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in example.items()
    }
    eval_batch = global_spec(eval_rows, setup.batch_sharding, jax.process_count())
    ahead.start("eval_step", lambda: eval_step.compile_for(state.params, eval_batch))
    if cfg.train.samples and jax.process_index() == 0:  # the samples after the last step
        params = finetune.full_params(cfg, setup.abstract_state.params, None)
        ahead.start(
            "sampling",
            lambda: sample_texts(
                setup, params, cfg.train.samples, cfg.train.sample_tokens, compile_only=True
            ),
        )


def dispatch_size(step: int, group: int, cfg) -> int:
    """Steps the call after ``step`` runs: ``group`` unless one of them but the last logs,
    evaluates or checkpoints, the run ends inside it, or the curriculum length changes in it; else 1.
    """
    t, d = cfg.train, cfg.data
    last = step + group  # the step count after the group
    if group <= 1 or last > t.steps:
        return 1
    for every in (t.log_every, t.eval_every, t.checkpoint_every):
        if (step // every + 1) * every < last:  # the next multiple falls inside the group
            return 1
    start_len = d.get("curriculum_start_len", 0)
    if start_len:
        length = lambda s: pipeline.curriculum_seq_len(  # noqa: E731
            s, start_len, d.get("curriculum_steps", 0), d.seq_len
        )
        if length(step) != length(last - 1):  # lengths only grow: equal ends, equal throughout
            return 1
    return group


def _shapes(batch: dict) -> dict:
    return {k: np.shape(v) for k, v in batch.items()}


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(config, workdir: str, *, print_fn=print) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the final metrics.

    SIGTERM/SIGINT save the current step and raise ``TrainingInterrupted`` (rerun to resume).
    """
    with PreemptionGuard() as guard, run_guard.workdir_errors(workdir):
        return _train(config, workdir, print_fn=print_fn, guard=guard)


def _train(config, workdir: str, *, print_fn, guard: PreemptionGuard) -> dict:
    jax.config.update("jax_threefry_partitionable", True)
    compile_cache.enable(config.train.get("compilation_cache_dir", ""))
    maybe_initialize(config.distributed)  # before anything (preflight too) touches the backend
    run_guard.prepare_workdir(workdir)
    if config.fault.preflight:
        run_preflight(config, workdir, print_fn=print_fn if jax.process_index() == 0 else None)
    setup = build(config, workdir)
    cfg, mesh = setup.config, setup.mesh
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint,
        hash_files=cfg.fault.checkpoint_hashes,
        report=print_fn if jax.process_index() == 0 else (lambda _: None),
        owner=True,
        accept_unlisted=cfg.fault.accept_unlisted_checkpoints,
    )
    latest = ckpt.latest_step()
    note = run_guard.check_progress(workdir, ckpt.directory, latest, cfg.fault.allow_restart)
    if note and jax.process_index() == 0:
        print_fn(note)
    # Plain pretraining: build the data and step functions first and compile the first train
    # call, the eval step and the sampler in background threads while the state initialises
    # or restores.
    ahead = CompileAhead()
    early = _compiles_ahead(cfg)
    if early:
        ds = _token_dataset(cfg, setup)
        train_step, eval_step = _step_functions(setup, None, None)
        _start_compiles(ahead, setup, train_step, eval_step, ds, latest or 0)
    iter_state = None
    if latest is not None:
        state, iter_state = ckpt.restore(latest, setup.abstract_state, setup.shardings)
        print_fn(f"resumed from {ckpt.directory} at step {latest}")
    else:
        state, _ = init_state(
            setup.model,
            setup.tx,
            cfg.data.seq_len,
            cfg.seed,
            mesh,
            setup.params_transform,
            setup.shardings,
        )
    initial, initial_shardings = None, None
    if finetune.needs_initial_params(cfg):
        initial, initial_shardings = finetune.initial_params(setup)
        if latest is None:
            state = finetune.start_state(setup, state, initial)
    frozen, frozen_shardings, extras = finetune.frozen_trees(
        setup, setup.tokenizer, initial, initial_shardings
    )
    is_main = jax.process_index() == 0
    if is_main:
        write_run_files(
            workdir,
            cfg,
            data_dir=setup.data_dir,
            tokenizer_fingerprint=setup.tokenizer.fingerprint(),
            mesh_shape=mesh.devices.shape,
            resumed_from=latest,
        )
    per_process = cfg.train.global_batch_size // jax.process_count()
    num_records = 0  # rows of a fine-tuning records run (names the batches if it diverges)
    fit_metrics = {}  # records runs: what fitting seq_len cut and dropped, logged at the start
    rl = None  # online RL: batches come from rollouts (lmtrain/train/rollout.py)
    if rollout.is_rl(cfg):
        rl = rollout.make_source(setup, frozen, iter_state, workdir, print_fn)
        fit_metrics = rl.fit_metrics  # prompts cut/dropped by config.data.truncation
    elif finetune.uses_records(cfg):
        rows, fit = finetune_data.rows_and_fit(cfg, setup.tokenizer, cfg.data.train_file)
        fit_metrics = fit.metrics("data/train/")
        for f in (fit, setup.eval_fit):
            if f is not None:
                print_fn(f.summary())
        if setup.eval_fit is not None:
            fit_metrics.update(setup.eval_fit.metrics("data/eval/"))
        if cfg.objective == "dpo" and cfg.dpo.reference == "precomputed":
            rows = finetune.add_reference_logps(setup, rows, initial, cfg.train.global_batch_size)
            if setup.eval_rows is not None:
                setup.eval_rows = finetune.add_reference_logps(
                    setup, setup.eval_rows, initial, cfg.train.global_batch_size
                )
        num_records = finetune_data.num_rows(rows)
        ds = finetune_data.train_dataset(
            rows,
            batch_size=per_process,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    elif not early:
        ds = _token_dataset(cfg, setup)
    if rl is None:
        it = pipeline.iterate(ds)
        if iter_state:
            it.set_state(iter_state)
        batches = Prefetcher(it, cfg.data.prefetch)
    else:
        batches = rl

    if not early:
        train_step, eval_step = _step_functions(setup, frozen_shardings, extras)
    # before the loop's calls: one program must not compile twice at once (the sampling
    # programs are only needed after the last step)
    ahead.wait("train_step", "eval_step")
    dpo_monitor = (
        DegenerateRunMonitor(cfg.dpo.degenerate_patience, warn=print_fn)
        if cfg.objective == "dpo"
        else None
    )
    logger = MetricsLogger(workdir, enabled=is_main, loggers=cfg.train.loggers)
    n_params = setup.model_cfg.param_count()
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    flops_per_step = flops_lib.flops_per_token(setup.model_cfg, cfg.data.seq_len) * tokens_per_step
    peak = cfg.train.peak_flops or flops_lib.device_peak_flops()
    start = int(state.step)
    if fit_metrics:
        logger.write(start, fit_metrics)
    print_fn(
        f"model: {n_params:,} params | mesh {dict(mesh.shape)} | {jax.device_count()} devices | "
        f"batch {cfg.train.global_batch_size}x{cfg.data.seq_len} | steps {start}->{cfg.train.steps}"
        + host_devices.console_note(jax.default_backend())
    )
    if note := warmup_note(cfg.optim, cfg.train.steps):
        print_fn(note)

    group = _dispatch_group(cfg)
    stacked_sharding = stacked_shardings(setup.batch_sharding)
    pending = []  # [(first step, steps, device metrics)] fetched one dispatch late (async)
    t_last, steps_since, final = time.perf_counter(), 0, {}
    t_start = t_last

    loss_acc = {"sum": 0.0, "n": 0, "last_step": -1}  # mean train loss over the log interval

    def flush(items) -> list[tuple[int, dict]]:
        """(step, metrics) per step of the dispatched calls; adds their losses to the log mean."""
        rows = []
        for first, n, device_metrics in items:
            host = jax.device_get(device_metrics)  # one transfer per call, not one per scalar
            for j in range(n):
                m = {k: float(v if np.ndim(v) == 0 else v[j]) for k, v in host.items()}
                rows.append((first + j, m))
        for step_done, m in rows:
            if step_done > loss_acc["last_step"] and np.isfinite(m["loss"]):
                loss_acc["sum"] += m["loss"]
                loss_acc["n"] += 1
                loss_acc["last_step"] = step_done
        return rows

    def dispatch(state, step):
        """Runs the next step, or the next ``group`` steps in one call; returns the pending items."""
        n = dispatch_size(step, group, cfg)
        host = []
        for j in range(n):
            if rl is not None:
                rl.params = state.params  # the rollout samples from the current policy
            history.record(step + j + 1, batches.get_state())
            # a few bucketed lengths under a sequence-length curriculum
            host.append(pipeline.curriculum_batch(next(batches), step + j, cfg.data))
        if n > 1 and all(_shapes(b) == _shapes(host[0]) for b in host):
            stacked = {k: np.stack([b[k] for b in host]) for k in host[0]}
            state, m = train_step.multi(state, to_global(stacked, stacked_sharding), frozen)
            return state, [(step + 1, n, m)]
        items = []
        for j, b in enumerate(host):  # one step per call (also batches of differing shapes)
            state, m = train_step(state, to_global(b, setup.batch_sharding), frozen)
            items.append((step + j + 1, 1, m))
        return state, items

    history = divergence.BatchHistory(cfg.train.max_nonfinite_in_a_row + 2 + 2 * group)
    spikes = divergence.SpikeGuard(
        cfg.fault.spike_factor, cfg.fault.spike_window, cfg.fault.max_rollbacks
    )
    warn_factor = 0.0 if cfg.fault.spike_factor else cfg.fault.spike_warn_factor  # rollback says it
    watch = run_guard.LossWatch(warn_factor, cfg.fault.spike_window, print_fn)
    steps = divergence.StepCounter(start, cfg.train.steps)
    last_saved = latest
    eval_hooks, stop_early = EvalHooks(cfg.train, workdir), False  # early stop / keep best
    streak = 0  # skipped (non-finite) steps in a row
    for step in steps:
        state, items = dispatch(state, step)
        n = sum(item[1] for item in items)
        steps.skip(n - 1)
        done = step + n
        prev, pending = pending, items
        steps_since += n
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or guard.requested:
            # A checkpoint may follow: check the newest steps too, so none is saved after a
            # non-finite streak that is only seen later (the save waits for this state anyway).
            prev, pending = prev + pending, []
        rolled_back = False
        rows = flush(prev)
        for s, m in rows:
            # Counted from the per-step metrics, not the state: the state is a call or two ahead
            # and a streak that ends inside that lag would otherwise go unseen.
            streak = streak + 1 if m["skipped"] else 0
            watch.observe(s, m["loss"])
            if streak >= cfg.train.max_nonfinite_in_a_row:
                _stop_diverged(
                    setup,
                    workdir,
                    ckpt,
                    batches,
                    logger,
                    history,
                    state,
                    s,
                    streak,
                    last_saved,
                    num_records,
                )
            if spikes.is_spike(m["loss"]):
                state, batches, last_saved = _rollback(
                    setup,
                    workdir,
                    ckpt,
                    ds,
                    batches,
                    history,
                    spikes,
                    s,
                    m["loss"],
                    state,
                    print_fn,
                )
                steps.rewind(last_saved)
                pending, steps_since, t_last, streak = [], 0, time.perf_counter(), 0
                rolled_back = True
                break
        if rolled_back:
            continue
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            s, m = (flush(pending) if pending else rows)[-1]
            now = time.perf_counter()
            dt = (now - t_last) / max(steps_since, 1)
            t_last, steps_since = now, 0
            if loss_acc["n"]:
                m["loss_avg"] = loss_acc["sum"] / loss_acc["n"]
            loss_acc.update(sum=0.0, n=0)
            if rl is not None:
                m.update(rl.metrics())
            m.update(
                {
                    "step_time_s": dt,
                    "tokens_per_s": tokens_per_step / dt,
                    "mfu": flops_per_step / dt / (peak * jax.device_count()) if peak else 0.0,
                }
            )
            logger.write(s, {f"train/{k}": v for k, v in m.items()})
            eta = dt * (cfg.train.steps - done)
            print_fn(
                f"step {s:>6}/{cfg.train.steps} | loss {m.get('loss_avg', m['loss']):.4f} | gnorm {m['grad_norm']:.3f} | "
                f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {dt * 1e3:.1f} ms/step | "
                f"MFU {100 * m['mfu']:.1f}% | ETA {_fmt_time(eta)}"
            )
            final.update({f"train/{k}": v for k, v in m.items()})
            if dpo_monitor is not None:
                dpo_monitor.update(s, m)
        has_eval = not (finetune.uses_records(cfg) and setup.eval_rows is None)  # no eval_file
        if (
            rl is not None
            and rl.has_eval
            and (done % cfg.train.eval_every == 0 or done == cfg.train.steps)
        ):
            ev = rl.evaluate(state.params, done)
            logger.write(done, ev)
            final.update(ev)
            print_fn(
                f"step {done:>6} | eval reward {ev['eval/reward']:.4f} | eval KL {ev.get('eval/kl', float('nan')):.4f}"
            )
        elif has_eval and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
            # Every periodic eval reads the same first train.eval_batches batches, so its points
            # compare; the final eval over the whole split is a series of its own (eval_full/*),
            # never joined to them, and the eval/* that final_metrics.json reports.
            ev = evaluate(setup, eval_step, state.params, cfg.train.eval_batches, frozen)
            full, whole = {}, {}
            if done == cfg.train.steps:
                whole = ev
                if cfg.train.eval_batches:  # the periodic evals were capped: read it all once
                    whole = evaluate(setup, eval_step, state.params, 0, frozen)
                full = {k.replace("eval/", "eval_full/", 1): v for k, v in whole.items()}
                print_fn(f"step {done:>6} | whole-split eval loss {whole['eval/loss']:.4f}")
            logger.write(done, ev | full)
            final.update(ev | full | whole)
            stop_early = eval_hooks.after_eval(done, ev, state, batches.get_state())
            print_fn(
                f"step {done:>6} | eval loss {ev['eval/loss']:.4f} | eval ppl {ev.get('eval/perplexity', float('nan')):.2f}"
            )
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            if int(state.nonfinite_in_a_row) > 0:  # keep the last good checkpoint
                print_fn(
                    f"step {done}: not checkpointing during {int(state.nonfinite_in_a_row)} non-finite steps"
                )
            else:
                ckpt.save(done, state, batches.get_state(), force=True)
                last_saved = done
                if finetune.lora_enabled(cfg) and is_main:
                    save_adapters(
                        os.path.join(workdir, "adapters"),
                        jax.device_get(state.params),
                        cfg,
                        step=done,
                    )
        if guard.requested and done < cfg.train.steps:
            if last_saved != done and int(state.nonfinite_in_a_row) == 0:
                ckpt.save(done, state, batches.get_state(), force=True)
                last_saved = done
            ckpt.close()
            batches.close()
            logger.close()
            raise TrainingInterrupted(
                f"{guard.name} received: stopped at step {done}; "
                + (
                    f"the newest checkpoint is step {last_saved} in {ckpt.directory}. Run the same "
                    "command to resume."
                    if last_saved is not None
                    else run_guard.last_checkpoint_phrase(None) + "."
                ),
                guard.signum,
            )
        if stop_early:
            if last_saved != done:
                ckpt.save(done, state, batches.get_state(), force=True)
                last_saved = done
            print_fn(
                f"step {done}: early stop, {cfg.train.early_stop_metric} has not improved for "
                f"{cfg.train.early_stop_patience} evaluations"
            )
            final["early_stopped_at"] = done
            break
    eval_hooks.close()
    ckpt.close()
    batches.close()
    if warnings := watch.finish():
        final["warnings"] = warnings
    final["wall_time_s"] = time.perf_counter() - t_start
    final["step"] = int(state.step)
    final["nonfinite_total"] = int(state.nonfinite_total)
    if is_main:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2, sort_keys=True)
    if (
        cfg.train.samples
        and is_main
        and (not finetune.uses_records(cfg) or cfg.train.sample_prompt)
    ):
        params = finetune.full_params(cfg, state.params, frozen)
        ahead.wait("sampling")
        for i, text in enumerate(
            sample_texts(setup, params, cfg.train.samples, cfg.train.sample_tokens)
        ):
            print_fn(f"--- sample {i} ---\n{text}")
    logger.close()
    return final | {"state": state}


def _rollback(setup, workdir, ckpt, ds, batches, history, spikes, s, loss, state, print_fn):
    """Loss spike at step s: restore the newest checkpoint before s, resume data after batch s."""
    cfg = setup.config
    ckpt.wait()
    before = [k for k in ckpt.all_steps() if k < s and ckpt.verify(k) is None]
    if not before:
        print_fn(
            f"step {s}: loss {loss:.4f} spiked (> {spikes.factor} x median {spikes.median():.4f}) "
            "but no checkpoint precedes it; continuing"
        )
        return state, batches, ckpt.latest_step()
    spikes.rollbacks += 1
    if spikes.rollbacks > spikes.max_rollbacks:
        ckpt.close()
        batches.close()
        raise divergence.TrainingDiverged(
            f"loss spiked {spikes.rollbacks} times (config.fault.max_rollbacks={spikes.max_rollbacks}); last at "
            f"step {s}: {loss:.4f} vs median {spikes.median():.4f}. See {divergence.ROLLBACK_FILE}; lower "
            "config.optim.lr or raise config.fault.spike_factor"
        )
    target = max(before)
    for k in ckpt.all_steps():
        if k > target:  # taken after the spike's update: not a state to keep
            ckpt.delete(k)
    state, saved_iter = ckpt.restore(target, setup.abstract_state, setup.shardings)
    resume_iter = history.get(s + 1)  # the stream just after the spiking batch
    batches.close()
    it = pipeline.iterate(ds)
    it.set_state(resume_iter)
    batches = Prefetcher(it, cfg.data.prefetch)
    record = {
        "step": s,
        "loss": loss,
        "median": spikes.median(),
        "factor": spikes.factor,
        "restored_step": target,
        "iter_state_restored": saved_iter,
        "iter_state_resumed": resume_iter,
    }
    if "next_index" in saved_iter and "next_index" in resume_iter:
        record["skipped_batch_indices"] = list(
            range(int(saved_iter["next_index"]), int(resume_iter["next_index"]))
        )
    if jax.process_index() == 0:
        divergence.log_rollback(workdir, record)
    print_fn(
        f"step {s}: loss {loss:.4f} > {spikes.factor} x median {spikes.median():.4f}; rolled back to step "
        f"{target} and skipped the data up to the spike (rollback {spikes.rollbacks}/{spikes.max_rollbacks})"
    )
    return state, batches, target


def _stop_diverged(
    setup, workdir, ckpt, batches, logger, history, state, done, n, last_saved, num_records=0
):
    """Too many non-finite steps in a row: keep the last good checkpoint, name the batches, stop.

    Token-shard runs name the windows of the train split; fine-tuning records runs
    (``num_records`` rows, same shuffle/batch structure) name the rows of ``data.train_file``.
    """
    cfg = setup.config
    ckpt.close()
    batches.close()
    logger.close()
    extra = None
    if finetune.uses_records(cfg):
        num_items, index_key = num_records, "row_indices"
        extra = {
            "train_file": os.path.abspath(cfg.data.train_file),
            "row_indices": (
                "rows of finetune_data.rows_for_objective(config, tokenizer, train_file): one record per row, "
                "except packed SFT rows, which hold several"
            ),
        }
    else:
        train_dir = os.path.join(setup.data_dir, cfg.data.train_split)
        num_items = (pipeline.TokenStream(train_dir).num_tokens - 1) // cfg.data.seq_len
        index_key = "window_indices"

    def items(iter_state):
        return divergence.batch_window_indices(
            num_items,
            cfg.train.global_batch_size // jax.process_count(),
            cfg.seed,
            int(iter_state["next_index"]),
            jax.process_index(),
            jax.process_count(),
        )

    path = os.path.join(workdir, divergence.REPORT_FILE)
    if jax.process_index() == 0:
        divergence.write_report(
            workdir,
            step=done,
            skipped_steps=list(range(done - n + 1, done + 1)),
            history=history,
            window_lookup=items,
            last_checkpoint=last_saved,
            nonfinite_total=int(state.nonfinite_total),
            index_key=index_key,
            extra=extra,
        )
    raise divergence.TrainingDiverged(
        f"{n} non-finite steps in a row (config.train.max_nonfinite_in_a_row) ending at step {done}; "
        f"the offending batches are listed in {path}; {run_guard.last_checkpoint_phrase(last_saved)}. "
        "Lower config.optim.lr or inspect/remove that data before resuming (a resume replays it)."
    )


def sample_texts(
    setup: Setup,
    params,
    n: int,
    max_new: int,
    prompt: str | None = None,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    compile_only: bool = False,
):
    """``n`` samples of ``max_new`` tokens; ``compile_only``: compile them (abstract params ok)."""
    from lmtrain.infer.sampling import generate_past_context

    tok = setup.tokenizer
    prompt = prompt if prompt is not None else setup.config.train.sample_prompt
    if prompt:
        ids = tok.encode(prompt)
    else:
        stream_ids = pipeline.TokenStream(
            os.path.join(setup.data_dir, setup.config.data.eval_split)
        ).read(0, 16)
        ids = [int(i) for i in stream_ids]
    if not compile_only:
        params = jax.device_get(params)
    outs = generate_past_context(
        setup.model,
        params,
        [ids] * n,
        max_new_tokens=max_new,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        compile_only=compile_only,
    )
    return [] if compile_only else [tok.decode(ids + o) for o in outs]


__all__ = ["train", "build", "evaluate", "sample_texts"]
