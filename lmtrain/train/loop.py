"""The training loop: set up, resume or init, step, log, evaluate, checkpoint, sample.

``train(config, workdir)`` is the single entry point used by the CLI, tests and notebooks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain import config as config_lib
from lmtrain.data import pipeline
from lmtrain.data.text_file import prepare_text_file
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.distributed import maybe_initialize
from lmtrain.errors import ConfigError, DataError
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import flops as flops_lib
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.metrics_log import MetricsLogger
from lmtrain.train.optim import make_optimizer
from lmtrain.train.prefetch import Prefetcher
from lmtrain.train.run_info import write_run_files
from lmtrain.train.state import init_state, state_shardings
from lmtrain.train.step import make_eval_step, make_train_step


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


def resolve_data(config, workdir: str) -> str:
    if config.data.path:
        return_dir = os.path.join(workdir, "data")
        if jax.process_index() == 0:
            prepare_text_file(config.data.path, return_dir, tokenizer=config.data.tokenizer,
                              val_fraction=config.data.val_fraction)
        return return_dir
    if not os.path.isdir(config.data.dir):
        raise DataError(
            f"config.data.dir={config.data.dir!r} does not exist; run `lmtrain data prepare` first "
            "or point config.data.dir at its output"
        )
    return config.data.dir


def build(config, workdir: str) -> Setup:
    maybe_initialize(config.distributed)
    config_lib.validate(config, jax.device_count())
    data_dir = resolve_data(config, workdir)
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    if config.model.vocab_size == 0:
        with config.unlocked():
            config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ({data_dir}/tokenizer); set it to 0 to follow the tokenizer"
        )
    mesh = make_mesh(config.mesh.shape)
    model_cfg = ModelConfig.from_config(config.model)
    model = Transformer(model_cfg)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    abstract, shardings = state_shardings(model, tx, config.data.seq_len, config.seed, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return Setup(config, mesh, model, model_cfg, tokenizer, data_dir, tx, schedule, abstract, shardings, batch_sharding)


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def evaluate(setup: Setup, eval_step, params, max_batches: int = 0) -> dict:
    cfg = setup.config
    split_dir = os.path.join(setup.data_dir, cfg.data.eval_split)
    per_process = cfg.train.global_batch_size // jax.process_count()
    sums: dict[str, float] = {}
    for batch in pipeline.eval_batches(split_dir, seq_len=cfg.data.seq_len, batch_size=per_process,
                                       max_batches=max_batches, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        out = eval_step(params, to_global(batch, setup.batch_sharding))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    weight = max(sums.get("weight", 0.0), 1.0)
    result = {"eval/loss": sums.get("loss_sum", 0.0) / weight, "eval/tokens": sums.get("weight", 0.0)}
    if "nll_sum" in sums:
        result["eval/perplexity"] = float(np.exp(sums["nll_sum"] / weight))
    return result


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(config, workdir: str, *, print_fn=print) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the final metrics."""
    jax.config.update("jax_threefry_partitionable", True)
    os.makedirs(workdir, exist_ok=True)
    setup = build(config, workdir)
    cfg, mesh = setup.config, setup.mesh
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoint)
    latest = ckpt.latest_step()
    iter_state = None
    if latest is not None:
        state, iter_state = ckpt.restore(latest, setup.abstract_state, setup.shardings)
        print_fn(f"resumed from {ckpt.directory} at step {latest}")
    else:
        state, _ = init_state(setup.model, setup.tx, cfg.data.seq_len, cfg.seed, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        write_run_files(workdir, cfg, data_dir=setup.data_dir, tokenizer_fingerprint=setup.tokenizer.fingerprint(),
                        mesh_shape=mesh.devices.shape, resumed_from=latest)
    per_process = cfg.train.global_batch_size // jax.process_count()
    ds = pipeline.train_dataset(os.path.join(setup.data_dir, cfg.data.train_split), seq_len=cfg.data.seq_len,
                                batch_size=per_process, seed=cfg.seed, process_index=jax.process_index(),
                                process_count=jax.process_count())
    it = iter(ds)
    if iter_state:
        it.set_state(iter_state)
    batches = Prefetcher(it, cfg.data.prefetch)

    train_step = make_train_step(setup.model, setup.tx, setup.schedule, cfg, mesh, setup.shardings, setup.batch_sharding)
    eval_step = make_eval_step(setup.model, cfg, mesh, setup.shardings.params, setup.batch_sharding)
    logger = MetricsLogger(workdir, enabled=is_main)
    n_params = setup.model_cfg.param_count()
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    flops_per_step = flops_lib.flops_per_token(setup.model_cfg, cfg.data.seq_len) * tokens_per_step
    peak = cfg.train.peak_flops or flops_lib.device_peak_flops()
    start = int(state.step)
    print_fn(f"model: {n_params:,} params | mesh {dict(mesh.shape)} | {jax.device_count()} devices | "
             f"batch {cfg.train.global_batch_size}x{cfg.data.seq_len} | steps {start}->{cfg.train.steps}")

    pending = None  # metrics fetched one step late so dispatch stays asynchronous
    t_last, steps_since, final = time.perf_counter(), 0, {}
    t_start = t_last

    def flush(pending_item):
        step_done, m = pending_item
        return step_done, {k: float(v) for k, v in m.items()}

    for step in range(start, cfg.train.steps):
        batch = to_global(next(batches), setup.batch_sharding)
        state, metrics = train_step(state, batch)
        prev, pending = pending, (step + 1, metrics)
        steps_since += 1
        if prev is not None:
            s, m = flush(prev)
            if m["skipped"] and int(state.nonfinite_in_a_row) >= cfg.train.max_nonfinite_in_a_row:
                raise RuntimeError(f"{cfg.train.max_nonfinite_in_a_row} non-finite steps in a row at step {s}; stopping")
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            s, m = flush(pending)
            now = time.perf_counter()
            dt = (now - t_last) / max(steps_since, 1)
            t_last, steps_since = now, 0
            m.update({"step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                      "mfu": flops_per_step / dt / (peak * jax.device_count()) if peak else 0.0})
            logger.write(s, {f"train/{k}": v for k, v in m.items()})
            eta = dt * (cfg.train.steps - done)
            print_fn(f"step {s:>6}/{cfg.train.steps} | loss {m['loss']:.4f} | gnorm {m['grad_norm']:.3f} | "
                     f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {dt * 1e3:.1f} ms/step | "
                     f"MFU {100 * m['mfu']:.1f}% | ETA {_fmt_time(eta)}")
            final.update({f"train/{k}": v for k, v in m.items()})
        if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
            ev = evaluate(setup, eval_step, state.params, cfg.train.eval_batches)
            logger.write(done, ev)
            final.update(ev)
            print_fn(f"step {done:>6} | eval loss {ev['eval/loss']:.4f} | eval ppl {ev.get('eval/perplexity', float('nan')):.2f}")
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            ckpt.save(done, state, batches.get_state(), force=True)
    ckpt.close()
    batches.close()
    final["wall_time_s"] = time.perf_counter() - t_start
    final["step"] = int(state.step)
    if is_main:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2, sort_keys=True)
    if cfg.train.samples and is_main:
        for i, text in enumerate(sample_texts(setup, state.params, cfg.train.samples, cfg.train.sample_tokens)):
            print_fn(f"--- sample {i} ---\n{text}")
    logger.close()
    return final | {"state": state}


def sample_texts(setup: Setup, params, n: int, max_new: int, prompt: str | None = None, temperature: float = 0.8, top_k: int = 40, seed: int = 0):
    from lmtrain.infer.sampling import generate

    tok = setup.tokenizer
    prompt = prompt if prompt is not None else setup.config.train.sample_prompt
    if prompt:
        ids = tok.encode(prompt)
    else:
        stream_ids = pipeline.TokenStream(os.path.join(setup.data_dir, setup.config.data.eval_split)).read(0, 16)
        ids = [int(i) for i in stream_ids]
    params = jax.device_get(params)
    outs = generate(setup.model, params, [ids] * n, max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    temperature=temperature, top_k=top_k, seed=seed)
    return [tok.decode(ids + o) for o in outs]


def params_from_state(state) -> dict:
    return state.params


__all__ = ["train", "build", "evaluate", "sample_texts", "jnp"]
