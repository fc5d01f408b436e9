"""nanoGPT's CPU "baby GPT" benchmark: val loss at step 2,000, wall time and tokens/s.

    python tools/bench_shakespeare.py [--devices 2] [--data ../shared/data/tinyshakespeare.txt] \
        [--config.train.steps=2000 ...]

Runs configs/shakespeare_char.py end to end (data preparation, compile, 2,000 steps with periodic
validation, a final full-split validation, checkpoints, a sample) and prints the figures beside
nanoGPT's published CPU figures (``NANOGPT`` below; docs/performance.md has the measured ones).

``--devices N`` emulates N host devices and puts the batch on a (N, 1, 1) data-parallel mesh:
XLA then runs the N shards on separate threads, which uses a small CPU's cores better than one
device's intra-op threading at this tiny size.

Compiles come from the persistent cache (``config.train.compilation_cache_dir``) when an earlier
run of the same config filled it; the figures say how many did. For a cold figure, run with
``--config.train.compilation_cache_dir=`` (cache off).

``--reference torch`` (the default when PyTorch is installed, e.g. with the ``hf`` extra) first
runs tools/torch_baby_gpt.py, the same recipe in eager PyTorch, in this process's session, so the
speed ratio is taken against a reference measured on the same machine on the same day; wall times
on shared 2-core machines drift by tens of percent between days. ``--reference none`` skips it.
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
    p.add_argument(
        "--reference",
        choices=("auto", "torch", "none"),
        default="auto",
        help="run the PyTorch baby GPT first and compare against it (auto: if torch imports)",
    )
    args, overrides = p.parse_known_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    ref = None
    if args.reference != "none":
        ref = _torch_reference(args.data, required=args.reference == "torch")

    import jax

    from lmtrain.config import load_config
    from lmtrain.train.loop import train

    overrides = [o.removeprefix("--config.") for o in overrides]
    cfg = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_char.py"),
        [f"data.path={os.path.abspath(args.data)}", f"mesh.shape=({args.devices},1,1)", *overrides],
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_shakespeare_")
    cache_hits = []  # executables loaded from the persistent compilation cache
    jax.monitoring.register_event_listener(
        lambda name, **_: cache_hits.append(name) if name.endswith("/cache_hits") else None
    )
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
        "compilation_cache_dir": cfg.train.compilation_cache_dir,
        "compiles_from_cache": len(cache_hits),
    }
    figures["speedup_vs_nanogpt_91s"] = NANOGPT["wall_s"] / wall
    cols = [("lmtrain", figures), ("nanoGPT 91 s", None)]
    if ref is not None:
        figures["torch_reference"] = ref
        figures["speedup_vs_torch_reference"] = ref["wall_s"] / wall
        cols.append(("torch, this run", ref))
    print()
    print(f"{'':22}" + "".join(f"{name:>18}" for name, _ in cols))
    rows = [
        (f"val loss @ {steps}", "val_loss", NANOGPT["val_loss"], "{:>18.4f}"),
        ("wall time (s)", "wall_s", NANOGPT["wall_s"], "{:>18.1f}"),
        ("ms / step (with evals)", "ms_per_step", NANOGPT["ms_per_iter"], "{:>18.1f}"),
    ]
    for label, key, published, fmt in rows:
        cells = [fmt.format(f[key]) if f is not None else fmt.format(published) for _, f in cols]
        print(f"{label:22}" + "".join(cells))
    ratios = [""] + [f"{(f or NANOGPT)['wall_s'] / wall:.2f}x" for _, f in cols[1:]]
    print(f"{'lmtrain speed-up':22}" + "".join(f"{r:>18}" for r in ratios))
    cache = cfg.train.compilation_cache_dir
    print(
        f"compiles loaded from the persistent cache: {len(cache_hits)} ({cache})"
        if cache
        else "persistent compilation cache off: a cold run"
    )
    print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = figures["val_loss"] <= 1.89 if steps == 2000 else True
    sys.exit(0 if ok else 1)


def _torch_reference(data: str, required: bool) -> dict | None:
    """tools/torch_baby_gpt.py in a child process (its threads and memory gone before ours)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torch") is None:  # not imported here: keep this process lean
        if required:
            sys.exit("--reference torch needs PyTorch: pip install -e '.[hf]'")
        print("PyTorch not installed: no same-session reference (compare with nanoGPT's 91 s)")
        return None
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_baby_gpt.py")
    print("running the PyTorch reference (tools/torch_baby_gpt.py) first ...", flush=True)
    out = subprocess.run(
        [sys.executable, script, "--data", data], capture_output=True, text=True, check=True
    )
    print(out.stdout.splitlines()[0])
    return json.loads(out.stdout.splitlines()[-1])


if __name__ == "__main__":
    main()
