"""Soak test: train a tiny model while killing and restarting it, then compare with an unkilled run.

    .venv/bin/python tools/soak.py --minutes 10 [--workdir /tmp/soak] [--seed 0]

One uninterrupted reference run is trained first (``python -m lmtrain train`` in a subprocess).
Then, until the time is up, rounds repeat: a fresh workdir is trained with the same command,
which is sent SIGKILL or SIGTERM (chosen at random) after a random delay - during start-up,
compiling, stepping or an async checkpoint write - and restarted, until one launch finishes on
its own. The round's final train state (params, optimizer state, rng, step, counters) must equal
the reference bit for bit. Prints one JSON summary (also written to ``<workdir>/soak.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(REPO, "data", "tinyshakespeare.txt")  # `lmtrain data fetch tinyshakespeare`


def overrides(text: str, steps: int) -> list[str]:
    o = {
        "data.path": text, "data.seq_len": 32, "model.max_seq_len": 32, "model.d_model": 32,
        "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 2, "model.d_ff": 64,
        "train.steps": steps, "train.global_batch_size": 8, "train.log_every": 100,
        "train.eval_every": 100000, "train.eval_batches": 1, "train.checkpoint_every": 10,
        "train.samples": 0, "optim.warmup_steps": 10,
    }  # fmt: skip
    return [f"--config.{k}={v}" for k, v in o.items()]


CODE = REPO  # replaced by a frozen copy in main(): every run of a soak uses the same code


def snapshot_code(root: str) -> str:
    """Copies lmtrain/ and configs/ so edits to the working tree cannot change a soak midway."""
    code = os.path.join(root, "code")
    shutil.rmtree(code, ignore_errors=True)
    for name in ("lmtrain", "configs"):
        shutil.copytree(os.path.join(REPO, name), os.path.join(code, name),
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return code


def command(workdir: str, text: str, steps: int) -> list[str]:
    cfg = os.path.join(CODE, "configs", "shakespeare_char.py")
    return [sys.executable, "-m", "lmtrain", "train", "--config", cfg, "--workdir", workdir,
            *overrides(text, steps)]  # fmt: skip


def env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=CODE,
                XLA_FLAGS="--xla_force_host_platform_device_count=2")  # fmt: skip


def final_state(workdir: str, step: int) -> dict:
    from lmtrain.train.checkpoint import Checkpointer

    ck = Checkpointer(os.path.join(workdir, "checkpoints"), report=lambda _: None)
    try:
        latest = ck.latest_step()
        if latest != step:
            raise RuntimeError(f"{workdir}: newest checkpoint is {latest}, expected {step}")
        return ck.read_arrays(step)
    finally:
        ck.close()


def identical(a: dict, b: dict) -> bool:
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


def kill_delay(rng: random.Random, startup: float, total: float, left: float) -> float:
    """A third of the kills land in start-up (import, preflight, restore, compile), the rest while
    stepping and checkpointing; ``left`` is the fraction of the steps this launch still has."""
    if rng.random() < 1 / 3:
        return rng.uniform(0.5, startup)
    return startup + rng.uniform(0.0, 0.95 * left * max(total - startup, 1.0))


def checkpointed_step(workdir: str) -> int:
    from lmtrain.train.checkpoint import Checkpointer

    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        return 0
    ck = Checkpointer(ckdir, report=lambda _: None)  # a reader: moves and deletes nothing
    try:
        return ck.latest_step() or 0
    finally:
        ck.close()


def chaos_round(workdir: str, text: str, steps: int, timing: list[float], rng: random.Random,
                max_kills: int, deadline: float, log) -> dict:  # fmt: skip
    """Trains to completion through random kills; returns counts and the log of every launch."""
    stats = {"sigkill": 0, "sigterm": 0, "launches": 0, "resumes": [], "corrupt_reports": 0,
             "tmp_discards": 0, "sigterm_clean_exits": 0, "sigkill_mid_write": 0,
             "finished": False}  # fmt: skip
    while True:
        stats["launches"] += 1
        with open(os.path.join(workdir + ".log"), "a") as out:
            out.write(f"\n=== launch {stats['launches']} ===\n")
            out.flush()
            proc = subprocess.Popen(command(workdir, text, steps), cwd=CODE, env=env(), stdout=out,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            t_launch = time.time()
            kills_left = stats["sigkill"] + stats["sigterm"] < max_kills and time.time() < deadline
            left = 1 - checkpointed_step(workdir) / steps
            delay = kill_delay(rng, *timing, left) if kills_left else None
            try:
                rc = proc.wait(timeout=delay)
                sent = None
                if delay is not None:  # finished before the planned kill: the machine got faster
                    expected = timing[0] + left * (timing[1] - timing[0])
                    scale = min(1.0, (time.time() - t_launch) / expected)
                    timing[:] = [timing[0] * scale, timing[1] * scale]
            except subprocess.TimeoutExpired:
                sent = rng.choice([signal.SIGKILL, signal.SIGTERM])
                proc.send_signal(sent)
                rc = proc.wait(timeout=300)
        with open(workdir + ".log") as f:
            launch_log = f.read().rsplit("=== launch", 1)[-1]
        for line in launch_log.splitlines():
            if line.startswith("resumed from"):
                stats["resumes"].append(int(line.rsplit(" ", 1)[-1]))
            stats["corrupt_reports"] += "is corrupt:" in line
            stats["tmp_discards"] += "discarding incomplete write" in line
        if sent is None:
            if rc != 0:
                raise RuntimeError(
                    f"launch {stats['launches']} failed with {rc}; see {workdir}.log"
                )
            stats["finished"] = True
            return stats
        name = signal.Signals(sent).name
        stats["sigkill" if sent == signal.SIGKILL else "sigterm"] += 1
        ckdir = os.path.join(workdir, "checkpoints")
        if (
            sent == signal.SIGKILL
            and os.path.isdir(ckdir)
            and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckdir))
        ):
            stats["sigkill_mid_write"] += 1  # killed while a checkpoint was being written
        if sent == signal.SIGTERM:
            if rc in (2, 143) and "SIGTERM received: stopped at step" in launch_log:
                stats["sigterm_clean_exits"] += 1
            elif rc not in (0, 2, 143, -signal.SIGTERM):  # -15: arrived before the handler was set
                raise RuntimeError(f"SIGTERM gave exit code {rc}; see {workdir}.log")
        log(f"  launch {stats['launches']}: {name} after {delay:.1f}s (exit {rc})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workdir", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-kills-per-round", type=int, default=15)
    p.add_argument("--text", default=TEXT, help="training text (its first 40,000 characters)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.text):
        sys.exit(f"{args.text} not found: run `lmtrain data fetch tinyshakespeare` or pass --text")

    root = args.workdir or tempfile.mkdtemp(prefix="lmtrain-soak-")
    os.makedirs(root, exist_ok=True)
    global CODE
    CODE = snapshot_code(root)
    sys.path.insert(0, CODE)  # final_state() reads checkpoints with the same code
    check = subprocess.run([sys.executable, "-c", "import lmtrain; print(lmtrain.__file__)"], cwd=CODE,
                           env=env(), capture_output=True, text=True)  # fmt: skip
    if not check.stdout.startswith(CODE):
        sys.exit(f"runs would not use the code snapshot in {CODE}: {check.stdout}{check.stderr}")
    text = os.path.join(root, "text.txt")
    with open(args.text, encoding="utf-8") as f, open(text, "w", encoding="utf-8") as g:
        g.write(f.read(40000))
    rng = random.Random(args.seed)
    start = time.time()
    deadline = start + 60 * args.minutes

    def log(msg):
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    ref_dir = os.path.join(root, "reference")
    shutil.rmtree(ref_dir, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.Popen(command(ref_dir, text, args.steps), cwd=CODE, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    startup, output = None, []
    for line in proc.stdout:
        output.append(line)
        if startup is None and line.startswith("step "):
            startup = time.time() - t0  # first logged step: imports, preflight, compile are done
    if proc.wait():
        sys.exit("reference run failed:\n" + "".join(output))
    ref_seconds = time.time() - t0
    reference = final_state(ref_dir, args.steps)
    log(
        f"reference: {args.steps} steps in {ref_seconds:.1f}s (first step logged at {startup:.1f}s)"
    )

    rounds = []
    timing = [startup, ref_seconds]  # start-up and total seconds of a run from step 0, adapted
    while time.time() < deadline:
        workdir = os.path.join(root, f"round{len(rounds)}")
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"round {len(rounds)}: {workdir}")
        stats = chaos_round(
            workdir,
            text,
            args.steps,
            timing,
            rng,
            args.max_kills_per_round,
            deadline,
            log,
        )
        stats["bitwise_equal"] = identical(final_state(workdir, args.steps), reference)
        rounds.append(stats)
        log(f"round {len(rounds) - 1}: {stats['sigkill']} SIGKILL + {stats['sigterm']} SIGTERM, "
            f"resumed at {stats['resumes']}, bitwise equal: {stats['bitwise_equal']}")  # fmt: skip
    summary = {
        "minutes": round((time.time() - start) / 60, 2),
        "rounds": len(rounds),
        "restarts_survived": sum(s["sigkill"] + s["sigterm"] for s in rounds),
        "sigkill": sum(s["sigkill"] for s in rounds),
        "sigterm": sum(s["sigterm"] for s in rounds),
        "sigterm_clean_exits": sum(s["sigterm_clean_exits"] for s in rounds),
        "sigkill_mid_checkpoint_write": sum(s["sigkill_mid_write"] for s in rounds),
        "resumes": sum(len(s["resumes"]) for s in rounds),
        "incomplete_writes_discarded": sum(s["tmp_discards"] for s in rounds),
        "corrupt_checkpoints_reported": sum(s["corrupt_reports"] for s in rounds),
        "all_bitwise_equal": all(s["bitwise_equal"] for s in rounds) and bool(rounds),
        "per_round": rounds,
        "workdir": root,
    }
    with open(os.path.join(root, "soak.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_round"}, indent=2))
    sys.exit(0 if summary["all_bitwise_equal"] else 1)


if __name__ == "__main__":
    main()
