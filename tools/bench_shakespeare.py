"""nanoGPT's CPU "baby GPT" benchmark: the README's shakespeare command beside PyTorch, one session.

    lmtrain data fetch tinyshakespeare
    python tools/bench_shakespeare.py [--devices N] [--data data/tinyshakespeare.txt] \
        [--config.train.steps=2000 ...]

Times the README's command as a user runs it, in a child process:
``lmtrain train --config configs/shakespeare_char.py --workdir <tmp>`` (data preparation, compile,
2,000 steps with periodic validation, a final full-split validation, checkpoints, a sample), and
reads the final validation loss from its ``metrics.jsonl``. With no ``XLA_FLAGS`` in the
environment the command picks its CPU device count itself (one per core); ``--devices N`` sets
``--xla_force_host_platform_device_count=N`` instead.

Compiles come from the persistent cache (``config.train.compilation_cache_dir``) when an earlier
run of the same config filled it. For a cold figure, add ``--config.train.compilation_cache_dir=``
(cache off).

``--reference torch`` (the default when PyTorch is installed, e.g. with the ``hf`` extra) first
runs tools/torch_baby_gpt.py, the same recipe in eager PyTorch, in this session, so the speed ratio
is taken against a reference measured on the same machine minutes apart: wall times on shared
2-core machines drift by tens of percent between days, so only ratios from one run are quoted.
nanoGPT's published figures (val loss 1.886, 91 s on another day) are printed for the loss only.
``--reference none`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "shakespeare_char.py")
NANOGPT_VAL_LOSS = 1.886  # published, nanoGPT README (CPU baby GPT, 2,000 iterations)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=0, help="0: the command's own default")
    p.add_argument("--data", default=os.path.join(REPO, "data", "tinyshakespeare.txt"))
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument(
        "--reference",
        choices=("auto", "torch", "none"),
        default="auto",
        help="run the PyTorch baby GPT first and compare against it (auto: if torch imports)",
    )
    args, overrides = p.parse_known_args()
    if not os.path.isfile(args.data):
        sys.exit(f"{args.data} not found: run `lmtrain data fetch tinyshakespeare` first")
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if args.devices:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()

    ref = None
    if args.reference != "none":
        ref = _torch_reference(args.data, required=args.reference == "torch")

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_shakespeare_")
    cmd = [sys.executable, "-m", "lmtrain", "train", "--config", CONFIG, "--workdir", workdir]
    cmd += [f"--config.data.path={os.path.abspath(args.data)}", *overrides]
    print("running:", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode:
        sys.exit(f"lmtrain train failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    console = run.stdout.splitlines()
    print("\n".join(ln for ln in console if ln.startswith(("model:", "optim:"))))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/loss" in r]
    steps = max(r["step"] for r in rows)
    tokens = steps * _config_tokens_per_step(overrides)
    figures = {
        "steps": steps,
        "val_loss": evals[-1]["eval/loss"],
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ms_per_step": 1e3 * wall / steps,
        "devices": args.devices or "default",
        "xla_flags": env.get("XLA_FLAGS", ""),
        "workdir": workdir,
        "command": " ".join(cmd[2:]),
    }
    cols = [("lmtrain", figures)]
    if ref is not None:
        figures["torch_reference"] = ref
        figures["speedup_vs_torch_reference"] = ref["wall_s"] / wall
        cols.append(("torch, this run", ref))
    print()
    print(f"{'':26}" + "".join(f"{name:>18}" for name, _ in cols) + f"{'nanoGPT published':>20}")
    print(
        f"{f'val loss @ {steps}':26}"
        + "".join(f"{f['val_loss']:>18.4f}" for _, f in cols)
        + f"{NANOGPT_VAL_LOSS:>20.3f}"
    )
    print(f"{'wall time (s)':26}" + "".join(f"{f['wall_s']:>18.1f}" for _, f in cols))
    print(
        f"{'ms / step (wall / steps)':26}" + "".join(f"{f['ms_per_step']:>18.1f}" for _, f in cols)
    )
    if ref is not None:
        print(f"{'lmtrain speed-up':26}{'':>18}{ref['wall_s'] / wall:>17.2f}x")
    print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = figures["val_loss"] <= 1.89 if steps == 2000 else True
    sys.exit(0 if ok else 1)


def _config_tokens_per_step(overrides: list[str]) -> int:
    sys.path.insert(0, REPO)
    from lmtrain.config import load_config

    cfg = load_config(CONFIG, [o.removeprefix("--config.") for o in overrides])
    return cfg.train.global_batch_size * cfg.data.seq_len


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
