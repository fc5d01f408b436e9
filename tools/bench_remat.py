"""Memory and speed of each remat policy (lmtrain.model.transformer.REMAT_POLICIES) on one config.

Runs tools/bench.py's measurement once per policy, back to back in one process, and prints a table
(+ JSON lines). Peak memory is the allocator's peak on GPU/TPU and XLA's compiled footprint on CPU
(args + outputs + temporaries), which is what remat changes. ``offload`` moves the saved matmul
outputs to pinned host memory; it is skipped where the device has no such memory.

    python tools/bench_remat.py --config configs/shakespeare_char.py --config.data.path=x \
        --config.model.vocab_size=65 --config.train.global_batch_size=32 --config.data.seq_len=256 \
        --config.model.max_seq_len=256
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import format_table, run_bench  # noqa: E402

from lmtrain import config as config_lib  # noqa: E402
from lmtrain.model.transformer import REMAT_POLICIES  # noqa: E402


def offload_supported() -> bool:
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    return "pinned_host" in kinds


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--policies", default=",".join(REMAT_POLICIES))
    p.add_argument("--json-out", default="")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    base = config_lib.load_config(args.config, overrides)
    rows = []
    for policy in args.policies.split(","):
        if policy == "offload" and not offload_supported():
            print(f"skip {policy}: no pinned_host memory on {jax.devices()[0].device_kind}")
            continue
        cfg = copy.deepcopy(base)
        with cfg.unlocked():
            cfg.model.remat = policy
        rows.append(run_bench(cfg, args.warmup, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    print(format_table(rows, ["remat", "batch", "step_time_s", "tokens_per_s", "mfu",
                              "peak_memory_gib", "loss"]))  # fmt: skip
    print(f"peak memory: {rows[0]['peak_memory_kind']}; device {rows[0]['device']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
