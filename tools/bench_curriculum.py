"""Time-to-loss with and without sequence-length warmup, back to back in one process.

Trains the same config twice (curriculum off, then on) and records the wall time at which the
validation loss (on ``--eval-batches`` batches, every ``--eval-every`` steps) first reaches each
target. Compile time counts (the curriculum compiles one step per length bucket). Timings on a
shared machine are noisy: compare the two rows of one run, not across runs.

    lmtrain data fetch tinyshakespeare
    python tools/bench_curriculum.py --config configs/shakespeare_char.py
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time

from lmtrain import config as config_lib
from lmtrain.train.loop import train


def run(cfg, label: str) -> dict:
    evals: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()

    def record(line: str) -> None:
        m = re.search(r"step\s+(\d+) \| eval loss ([\d.]+)", line)
        if m:
            evals.append((int(m.group(1)), float(m.group(2)), time.perf_counter() - t0))
        print(f"[{label}] {line}", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        final = train(cfg, workdir, print_fn=record)
    return {"label": label, "evals": evals, "wall_s": time.perf_counter() - t0,
            "final_eval_loss": final.get("eval/loss")}  # fmt: skip


def time_to(evals, target: float):
    for step, loss, t in evals:
        if loss <= target:
            return step, t
    return None, None


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--start-len", type=int, default=16)
    p.add_argument("--curriculum-steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--targets", default="2.2,2.0,1.9")
    p.add_argument("--json-out", default="")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    base = config_lib.load_config(args.config, overrides)
    with base.unlocked():
        base.train.eval_every = args.eval_every
        base.train.eval_batches = args.eval_batches
        base.train.samples = 0
        base.train.checkpoint_every = base.train.steps
    on = copy.deepcopy(base)
    with on.unlocked():
        on.data.curriculum_start_len = args.start_len
        on.data.curriculum_steps = args.curriculum_steps
    results = [run(base, "baseline"), run(on, f"warmup {args.start_len}->{base.data.seq_len}")]
    targets = [float(x) for x in args.targets.split(",")]
    print(
        f"\n{'run':<22} | "
        + " | ".join(f"to {t:.2f}: step, s" for t in targets)
        + " | final eval | wall s"
    )
    for r in results:
        cells = []
        for t in targets:
            step, s = time_to(r["evals"], t)
            cells.append(f"{step}, {s:.1f}".rjust(16) if step else "not reached".rjust(16))
        print(
            f"{r['label']:<22} | "
            + " | ".join(cells)
            + f" | {r['final_eval_loss']:.4f} | {r['wall_s']:.1f}"
        )
    print(json.dumps(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
