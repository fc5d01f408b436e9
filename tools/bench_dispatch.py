"""Host-side step overheads: one step per call vs several (``train.steps_per_dispatch``), and the
SPMD gradient all-reduce vs one flat all-reduce (``train.grad_sync``), interleaved in one process.
When the config sets ``train.cpu_opt_level`` (the shakespeare config: 1), the grouped step also
runs compiled at XLA's default level (-O2) beside it.

    python tools/bench_dispatch.py --config configs/shakespeare_char.py [--devices 2] \
        [--steps-per-dispatch 50] [--rounds 8] [--config.model.d_model=256 ...]

Each variant has its own state and compiled step; the one-step variants alternate round by round
(so machine noise hits them alike), then the grouped one runs; each round runs ``steps-per-dispatch x 2`` steps the way the training
loop does: a fresh host batch per step put on the devices, metrics fetched one call late. Prints
the median ms/step per variant and its ratio to the first (one step per call, SPMD all-reduce).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--devices", type=int, default=2, help="emulated CPU devices (data parallel)")
    p.add_argument("--steps-per-dispatch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        ).strip()
    import jax
    import numpy as np

    from lmtrain import config as config_lib
    from lmtrain.model.config import ModelConfig
    from lmtrain.model.sharding import batch_sharding, make_mesh
    from lmtrain.model.transformer import Transformer
    from lmtrain.train.config_check import validate
    from lmtrain.train.optim import make_optimizer
    from lmtrain.train.state import init_state
    from lmtrain.train.step import make_train_step, stacked_shardings, uses_flat_grad_sync

    sys.path.insert(0, os.path.dirname(__file__))
    from bench import synthetic_batch

    jax.config.update("jax_threefry_partitionable", True)
    k = args.steps_per_dispatch
    base = config_lib.load_config(args.config, [*overrides, "mesh.shape=(-1,1,1)"])
    with base.unlocked():
        base.model.vocab_size = base.model.vocab_size or 256
        base.data.dir, base.data.path = "<synthetic>", ""
    validate(base, jax.device_count())
    gb, seq = base.train.global_batch_size, base.data.seq_len
    hosts = [synthetic_batch(gb, seq, base.model.vocab_size, seed=i) for i in range(2 * k)]

    def make(grad_sync: str, group: int, opt_level: int | None = None):
        cfg = base.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.train.grad_sync = grad_sync
            if opt_level is not None:
                cfg.train.cpu_opt_level = opt_level
        level = cfg.train.cpu_opt_level
        mesh = make_mesh(cfg.mesh.shape)
        model = Transformer(ModelConfig.from_config(cfg.model))
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
        state, shardings = init_state(model, tx, seq, cfg.seed, mesh)
        bs = batch_sharding(mesh)
        step = make_train_step(model, schedule, cfg, mesh, shardings, bs)
        flat = uses_flat_grad_sync(cfg, mesh)
        return {"state": state, "step": step, "bs": bs, "sk": stacked_shardings(bs), "k": group,
                "name": f"{group} step{'s' if group > 1 else ''} per call, "
                        f"{'flat' if flat else 'SPMD'} all-reduce"
                        + (f", LLVM -O{level}" if level >= 0 else ", LLVM -O2 (XLA default)")}  # fmt: skip

    def run_round(v) -> float:
        """ms/step over 2k steps, the loop's way: fresh host batches, metrics one call late."""
        state, step, pending = v["state"], v["step"], None
        t = time.perf_counter()
        for i in range(0, len(hosts), v["k"]):
            if v["k"] == 1:
                state, m = step(state, jax.device_put(hosts[i], v["bs"]))
            else:
                group = hosts[i : i + v["k"]]
                stacked = {key: np.stack([h[key] for h in group]) for key in group[0]}
                state, m = step.multi(state, jax.device_put(stacked, v["sk"]))
            if pending is not None:
                jax.device_get(pending)
            pending = m
        jax.device_get(pending)
        v["state"] = state
        return (time.perf_counter() - t) / len(hosts) * 1e3

    variants = [make("spmd", 1)]
    if args.devices > 1:
        variants.append(make("flat", 1))
    grouped = [make("flat" if args.devices > 1 else "spmd", k)]
    if base.train.cpu_opt_level >= 0 and jax.default_backend() == "cpu":
        grouped.append(make("flat" if args.devices > 1 else "spmd", k, opt_level=-1))
    times = {v["name"]: [] for v in variants + grouped}
    # One-step variants alternate round by round; the grouped ones run after them: one-step
    # calls interleaved with the scan program ran slower than on their own.
    for phase in (variants, grouped):
        for v in phase:  # compile and warm up
            run_round(v)
        for _ in range(args.rounds):
            for v in phase:
                times[v["name"]].append(run_round(v))
    ref = statistics.median(times[variants[0]["name"]])
    rows = []
    print(f"{jax.device_count()} devices, batch {gb}x{seq}, {args.rounds} rounds of {2 * k} steps")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "ms_per_step": med, "min_ms": min(ts), "vs_first": med / ref})
        print(f"{name:62} {med:7.2f} ms/step (min {min(ts):6.2f})  {med / ref:5.2f}x")
    print(json.dumps({"devices": jax.device_count(), "batch": f"{gb}x{seq}", "rows": rows}))


if __name__ == "__main__":
    main()
