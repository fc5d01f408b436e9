"""Training-step benchmark: step time, tokens/s (total and per device), MFU and peak memory.

Synthetic tokens (no data files), the real train step (same jit, shardings, optimizer and remat as
``lmtrain train``). Times ``--steps`` steps after ``--warmup`` steps (compile included there) and
reports the median. Prints a table and one JSON line (``--json-out`` also writes it to a file).

    python tools/bench.py --config configs/llama_1b.py --config.mesh.shape='(1,1,1)' \
        --config.train.global_batch_size=4 --config.train.microbatches=1 --steps 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from lmtrain import config as config_lib
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import LOGICAL_RULES, batch_sharding, make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import flops as flops_lib
from lmtrain.train.config_check import validate
from lmtrain.train.optim import make_optimizer
from lmtrain.train.state import init_state
from lmtrain.train.step import make_train_step


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq), np.int32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


def _peak_memory_bytes(compiled) -> tuple[float, str]:
    """Device allocator peak where the runtime reports it, else XLA's compiled footprint."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "allocator peak (device 0)"
    ma = compiled.memory_analysis()
    if ma is None:
        return float("nan"), "unavailable"
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    return float(total - ma.alias_size_in_bytes), "XLA compiled footprint (args+out+temp-alias)"


def run_bench(cfg, warmup: int = 3, steps: int = 10) -> dict:
    """Benchmarks the train step of ``cfg`` on the running devices; returns the figures."""
    jax.config.update("jax_threefry_partitionable", True)
    if cfg.model.vocab_size == 0:
        with cfg.unlocked():
            cfg.model.vocab_size = 256
    with cfg.unlocked():
        if not (cfg.data.dir or cfg.data.path):
            cfg.data.dir = "<synthetic>"
    validate(cfg, jax.device_count())
    mesh = make_mesh(cfg.mesh.shape)
    model_cfg = ModelConfig.from_config(cfg.model)
    model = Transformer(model_cfg)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    seq, gb = cfg.data.seq_len, cfg.train.global_batch_size
    state, shardings = init_state(model, tx, seq, cfg.seed, mesh)
    bs = batch_sharding(mesh)
    step = make_train_step(model, schedule, cfg, mesh, shardings, bs)
    batch = {
        k: jax.device_put(v, bs) for k, v in synthetic_batch(gb, seq, model_cfg.vocab_size).items()
    }
    t0 = time.perf_counter()
    with mesh, nn.logical_axis_rules(LOGICAL_RULES):  # as step() traces it
        compiled = step.jitted.lower(state, batch, None).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = compiled(state, batch, None)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, None)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    n_dev = jax.device_count()
    tokens = gb * seq
    flops = flops_lib.flops_per_token(model_cfg, seq) * tokens
    peak = cfg.train.peak_flops or flops_lib.device_peak_flops()
    mem, mem_kind = _peak_memory_bytes(compiled)
    return {
        "device": jax.devices()[0].device_kind,
        "devices": n_dev,
        "params": model_cfg.param_count(),
        "batch": f"{gb}x{seq}",
        "remat": model_cfg.remat,
        "attention": model_cfg.attention,
        "dtype": model_cfg.dtype,
        "compile_s": compile_s,
        "step_time_s": dt,
        "step_time_min_s": min(times),
        "tokens_per_s": tokens / dt,
        "tokens_per_s_per_device": tokens / dt / n_dev,
        "mfu": flops / dt / (peak * n_dev) if peak else float("nan"),
        "peak_flops_per_device": peak,
        "peak_memory_gib": mem / 1024**3,
        "peak_memory_kind": mem_kind,
        "host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "loss": float(m["loss"]),
        "steps_timed": steps,
    }


def format_table(rows: list[dict], keys=None) -> str:
    keys = keys or ["batch", "remat", "attention", "step_time_s", "tokens_per_s",
                    "tokens_per_s_per_device", "mfu", "peak_memory_gib"]  # fmt: skip

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: " | ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(keys), "-+-".join("-" * w for w in widths)] + [line(c) for c in cells])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json-out", default="")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    cfg = config_lib.load_config(args.config, overrides)
    r = run_bench(cfg, args.warmup, args.steps)
    print(format_table([r]))
    print(
        f"device {r['device']} x{r['devices']} | {r['params']:,} params | peak memory: "
        f"{r['peak_memory_kind']} | compile {r['compile_s']:.1f} s"
    )
    print(json.dumps(r))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
