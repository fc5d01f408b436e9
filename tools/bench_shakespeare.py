"""nanoGPT's CPU "baby GPT" benchmark: val loss at step 2,000, wall time and tokens/s.

    python tools/bench_shakespeare.py [--devices 2] [--data ../shared/data/tinyshakespeare.txt] \
        [--config.train.steps=2000 ...]

Runs configs/shakespeare_char.py end to end (data preparation, compile, 2,000 steps with periodic
validation, a final full-split validation, checkpoints, a sample) and prints the figures beside
nanoGPT's, measured on the same 2-core machine class (val loss 1.886, 91 s wall, ~40 ms/iter).

``--devices N`` emulates N host devices and puts the batch on a (N, 1, 1) data-parallel mesh:
XLA then runs the N shards on separate threads, which uses both cores of a 2-core CPU better than
one device's intra-op threading at this tiny size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

NANOGPT = {"val_loss": 1.886, "wall_s": 91.0, "ms_per_iter": 40.0}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=2)
    p.add_argument(
        "--data",
        default=os.path.join(
            os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
        ),
    )
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args, overrides = p.parse_known_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from lmtrain.config import load_config
    from lmtrain.train.loop import train

    overrides = [o.removeprefix("--config.") for o in overrides]
    cfg = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_char.py"),
        [f"data.path={os.path.abspath(args.data)}", f"mesh.shape=({args.devices},1,1)", *overrides],
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_shakespeare_")
    t0 = time.perf_counter()
    out = train(cfg, workdir)
    wall = time.perf_counter() - t0
    steps = cfg.train.steps
    tokens = steps * cfg.train.global_batch_size * cfg.data.seq_len
    figures = {
        "steps": steps,
        "val_loss": out["eval/loss"],
        "wall_s": wall,
        "train_loop_s": out["wall_time_s"],
        "tokens_per_s": tokens / out["wall_time_s"],
        "ms_per_step": 1e3 * out["wall_time_s"] / steps,
        "devices": args.devices,
        "workdir": workdir,
    }
    print()
    print(f"{'':22}{'lmtrain':>12}{'nanoGPT (CPU)':>16}")
    print(
        f"{'val loss @ ' + str(steps):22}{figures['val_loss']:>12.4f}{NANOGPT['val_loss']:>16.3f}"
    )
    print(f"{'wall time (s)':22}{wall:>12.1f}{NANOGPT['wall_s']:>16.1f}")
    print(f"{'ms / step (loop)':22}{figures['ms_per_step']:>12.1f}{NANOGPT['ms_per_iter']:>16.1f}")
    print(
        f"{'tokens / s (loop)':22}{figures['tokens_per_s']:>12,.0f}{12 * 64 / NANOGPT['ms_per_iter'] * 1e3:>16,.0f}"
    )
    print(f"{'speed-up (wall)':22}{NANOGPT['wall_s'] / wall:>12.2f}x")
    print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = figures["val_loss"] <= 1.89 if steps == 2000 else True
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
