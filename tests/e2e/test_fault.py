"""Fault tolerance: preemption, kill -9 mid-checkpoint, corrupt checkpoints, non-finite batches.

Runs are tiny (d_model 32, 2 layers, seq 32, batch 8) on the committed tinyshakespeare excerpt
(tests/support/data). Interrupted runs are real ``python -m lmtrain train`` subprocesses; their final train
state must equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from lmtrain.config import load_config
from lmtrain.data import pipeline
from lmtrain.data.shards import TokenStream
from lmtrain.train import loop
from lmtrain.train.checkpoint import LISTING_FILE, TMP_MARKER, Checkpointer
from lmtrain.train.divergence import REPORT_FILE, TrainingDiverged
from tests.support.public_data import SHAKESPEARE_HEAD

pytestmark = pytest.mark.slow  # end-to-end: trains, resumes or runs processes

REPO = str(Path(__file__).resolve().parents[2])
CONFIG = os.path.join(REPO, "configs", "shakespeare_char.py")
STEPS = 24
ORIGINAL_TRAIN_DATASET = pipeline.train_dataset


def tiny_overrides(text_path: str, **extra) -> list[str]:
    base = {
        "data.path": text_path,
        "data.seq_len": 32,
        "model.max_seq_len": 32,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.n_kv_heads": 2,
        "model.d_ff": 64,
        "train.steps": STEPS,
        "train.global_batch_size": 8,
        "train.log_every": 1,
        "train.eval_every": 1000,
        "train.eval_batches": 1,
        "train.checkpoint_every": 8,
        "train.samples": 0,
        "optim.warmup_steps": 2,
        "mesh.num_devices": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def write_text(path: str) -> str:
    shutil.copyfile(SHAKESPEARE_HEAD, path)  # committed fixture: every clone has it
    return path


def assert_trees_equal(a, b, what: str) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{what}: tree structures differ"
    for i, (x, y) in enumerate(zip(la, lb)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: leaf {i} dtype/shape differ"
        assert x.tobytes() == y.tobytes(), f"{what}: leaf {i} differs"


def train_in_process(workdir: str, text: str, **extra) -> dict:
    cfg = load_config(CONFIG, tiny_overrides(text, **extra))
    return loop.train(cfg, workdir, print_fn=lambda *_: None)


def cli_command(workdir: str, text: str, **extra) -> list[str]:
    over = [f"--config.{o}" for o in tiny_overrides(text, **extra)]
    return ["-m", "lmtrain", "train", "--config", CONFIG, "--workdir", workdir, *over]


def run_cli(args: list[str], *, timeout: int = 240):
    cmd = [sys.executable, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(str(tmp_path_factory.mktemp("text") / "tiny.txt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):
    """An uninterrupted run: its final train state is what every interrupted run must reach."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train_in_process(workdir, text_file)
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    arrays = ck.read_arrays(STEPS)
    ck.close()
    return workdir, arrays


# Runs the CLI but SIGKILLs the process at the moment Orbax would commit step KILL_STEP: every
# file of that step is written into its temporary directory, nothing is renamed yet.
KILL_DURING_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        if self._final_path.name == os.environ["KILL_STEP"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    from lmtrain.cli import main
    main(sys.argv[1:])
    """
)


def test_sigterm_then_kill9_mid_checkpoint_resume_bitwise(tmp_path, text_file, reference):
    _, want = reference
    workdir = str(tmp_path / "run")
    ckdir = os.path.join(workdir, "checkpoints")

    # 1. SIGTERM mid-run: saves the current step, exits with a clear message.
    proc = subprocess.Popen(
        [sys.executable, *cli_command(workdir, text_file)],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out  # 143, the scheduler convention
    assert "SIGTERM received: stopped at step" in out, out
    assert "Run the same command to resume." in out
    ck = Checkpointer(ckdir)
    stopped = ck.latest_step()
    ck.close()
    # Saved at the step it stopped (a loaded machine may read the log a few steps late).
    assert 3 <= stopped < 16 and f"stopped at step {stopped};" in out, out
    previous = max(8, stopped)  # the newest complete checkpoint once step 16 is lost

    # 2. Resume, and kill -9 while step 16 is being written (files written, not committed).
    env = dict(os.environ, PYTHONUNBUFFERED="1", KILL_STEP="16")
    r = subprocess.run(
        [sys.executable, "-c", KILL_DURING_COMMIT, *cli_command(workdir, text_file)[2:]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert f"resumed from {ckdir} at step {stopped}" in r.stdout
    names = os.listdir(ckdir)
    assert str(previous) in names and "16" not in names, names
    assert any(n.startswith("16" + TMP_MARKER) for n in names), names  # the half-done write

    # 3. The same command resumes from the newest complete step and matches bitwise.
    r = run_cli(cli_command(workdir, text_file))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "discarding incomplete write(s) from an earlier run: 16" + TMP_MARKER in r.stdout
    assert f"resumed from {ckdir} at step {previous}" in r.stdout
    ck = Checkpointer(ckdir)
    assert ck.latest_step() == STEPS
    got = ck.read_arrays(STEPS)
    ck.close()
    assert not any(TMP_MARKER in n for n in os.listdir(ckdir))
    assert_trees_equal(got, want, "resumed vs uninterrupted train state")


def _largest_file(root: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_truncated_checkpoint_detected_skipped_and_resume_bitwise(tmp_path, text_file, reference):
    ref_dir, want = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    victim = _largest_file(os.path.join(ckdir, str(STEPS), "state"))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)

    messages = []
    reader = Checkpointer(ckdir, report=messages.append)  # eval/generate: skip, touch nothing
    assert reader.latest_step() == 16 and reader.latest_step() == 16
    reader.close()
    assert len(messages) == 1 and "skipping corrupt step 24" in messages[0], messages
    assert str(STEPS) in os.listdir(ckdir)

    messages = []
    ck = Checkpointer(ckdir, report=messages.append, owner=True)  # the training run
    assert ck.latest_step() == 16
    ck.close()
    assert len(messages) == 1 and f"step {STEPS}" in messages[0] and "truncated" in messages[0]
    assert os.path.relpath(victim, os.path.join(ckdir, str(STEPS))) in messages[0]
    assert str(STEPS) not in os.listdir(ckdir)
    (moved,) = os.listdir(ckdir + ".corrupt")
    assert moved.startswith(f"{STEPS}-")

    # Resuming retrains 16 -> 24 from the previous checkpoint and reaches the same state.
    cfg = load_config(CONFIG, tiny_overrides(text_file))
    printed = []
    loop.train(cfg, workdir, print_fn=printed.append)
    assert any("resumed from" in p and "at step 16" in p for p in printed), printed
    ck = Checkpointer(ckdir)
    assert_trees_equal(ck.read_arrays(STEPS), want, "state after skipping a truncated checkpoint")
    ck.close()


def test_flipped_byte_same_size_detected(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    tree = {"w": np.arange(64, dtype=np.float32), "b": np.ones((4, 4), np.float32)}
    ck.save(1, tree, {"next_index": 1}, force=True)
    ck.save(2, jax.tree.map(lambda x: x + 1, tree), {"next_index": 2}, force=True)
    ck.close()
    listing = json.load(open(tmp_path / "ck" / "2" / LISTING_FILE))["files"]
    assert all(set(v) == {"size", "sha256"} for v in listing.values())
    victim = _largest_file(str(tmp_path / "ck" / "2" / "state"))
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    messages = []
    ck = Checkpointer(str(tmp_path / "ck"), report=messages.append, owner=True)
    assert ck.latest_step() == 1
    assert "SHA-256" in messages[0]
    got = ck.read_arrays(1)
    ck.close()
    np.testing.assert_array_equal(got["w"], tree["w"])


def _poison(bad: set[int]):
    """Wraps pipeline.train_dataset: batches with these indices get a NaN loss mask."""
    original = pipeline.train_dataset

    def train_dataset(*args, **kwargs):
        def poison(index, batch):
            batch = dict(batch)
            mask = batch["loss_mask"].astype(np.float32)
            if index in bad:
                mask[:] = np.nan
            batch["loss_mask"] = mask
            return batch

        return original(*args, **kwargs).map_with_index(poison)

    return train_dataset


def _metrics(workdir: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out


def test_nan_batch_is_skipped_and_counted(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(pipeline, "train_dataset", _poison({3}))
    workdir = str(tmp_path / "run")
    final = train_in_process(
        workdir,
        text_file,
        **{"train.steps": 8, "train.checkpoint_every": 1, "train.keep_checkpoints": 20},
    )
    assert final["nonfinite_total"] == 1 and final["step"] == 8
    m = _metrics(workdir)
    skipped = {s: r["train/skipped"] for s, r in m.items() if "train/skipped" in r}
    assert skipped == {s: (1.0 if s == 4 else 0.0) for s in range(1, 9)}
    assert m[4]["train/loss"] is None and np.isfinite(m[5]["train/loss"])  # NaN logged as null
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ck.all_steps() == [1, 2, 3, 5, 6, 7, 8]  # no checkpoint while non-finite
    s3, s5 = ck.read_arrays(3), ck.read_arrays(5)
    ck.close()
    assert int(s5["nonfinite_total"]) == 1 and int(s5["nonfinite_in_a_row"]) == 0
    assert int(s3["nonfinite_total"]) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(s5["params"]))


def test_nan_streak_stops_keeps_good_checkpoint_and_names_batches(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(pipeline, "train_dataset", _poison({3, 4, 5}))
    workdir = str(tmp_path / "run")
    extra = {"train.steps": 12, "train.checkpoint_every": 2, "train.max_nonfinite_in_a_row": 3}
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row .* ending at step 6"):
        train_in_process(workdir, text_file, **extra)
    report = json.load(open(os.path.join(workdir, REPORT_FILE)))
    assert report["stopped_at_step"] == 6 and report["last_good_checkpoint"] == 2
    batches = report["offending_batches"]
    assert [b["step"] for b in batches] == [4, 5, 6]
    assert [b["batch_index"] for b in batches] == [3, 4, 5]
    assert [b["iter_state_before"]["next_index"] for b in batches] == [3, 4, 5]
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ck.all_steps() == [2]
    ck.close()
    # The named windows are exactly the tokens of the offending batch.
    train_dir = os.path.join(workdir, "data", "train")
    ds = ORIGINAL_TRAIN_DATASET(train_dir, seq_len=32, batch_size=8, seed=0)
    stream = TokenStream(train_dir)
    for b in batches:
        want = ds[b["batch_index"]]["inputs"]
        got = np.stack([stream.read(w * 32, 33)[:-1] for w in b["window_indices"]])
        np.testing.assert_array_equal(got, want)


class _SkipOne:
    """Random access to a dataset with element ``gap`` left out (the reference for a rollback)."""

    def __init__(self, ds, gap: int):
        self.ds, self.gap = ds, gap

    def __len__(self) -> int:
        return len(self.ds) - 1

    def __getitem__(self, i: int):
        return self.ds[i + (i >= self.gap)]


@pytest.mark.parametrize("group", [1, 2])  # 2: the spike is seen a call late, mid-group
def test_loss_spike_rolls_back_and_skips_the_data(tmp_path, text_file, monkeypatch, group):
    import grain
    import jax.numpy as jnp

    from lmtrain.train import objectives

    lm = objectives.OBJECTIVES["lm"]

    def scaled_lm(params, batch, rng, ctx):  # a batch can carry a loss multiplier (the "spike")
        loss_sum, weight, metrics = lm(params, batch, rng, ctx)
        if "loss_scale" in batch:
            loss_sum = loss_sum * jnp.mean(batch["loss_scale"])
        return loss_sum, weight, metrics

    def with_scale(bad: set[int]):
        def add(index, batch):
            scale = 50.0 if index in bad else 1.0
            return dict(batch, loss_scale=np.full(batch["inputs"].shape, scale, np.float32))

        return add

    monkeypatch.setitem(objectives.OBJECTIVES, "lm", scaled_lm)
    extra = {"train.steps": 16, "train.checkpoint_every": 4, "train.keep_checkpoints": 3}
    if group > 1:
        extra.update({"train.steps_per_dispatch": group, "train.log_every": 4})

    # Spike on batch 9 (step 10): rolls back to step 8 and continues with batch 10.
    monkeypatch.setattr(
        pipeline,
        "train_dataset",
        lambda *a, **k: ORIGINAL_TRAIN_DATASET(*a, **k).map_with_index(with_scale({9})),
    )
    spiky = str(tmp_path / "spiky")
    spike_cfg = {"fault.spike_factor": 3.0, "fault.spike_window": 4}
    final = train_in_process(spiky, text_file, **extra, **spike_cfg)
    assert final["step"] == 16
    (rb,) = [json.loads(line) for line in open(os.path.join(spiky, "rollbacks.jsonl"))]
    assert rb["step"] == 10 and rb["restored_step"] == 8 and rb["skipped_batch_indices"] == [8, 9]
    assert rb["loss"] > 3 * rb["median"]

    # Reference: no spike detection, and the stream with batches 8 and 9 removed after step 8,
    # i.e. steps 1-8 on batches 0-7 and steps 9-16 on batches 10-17.
    def reference_dataset(*a, **k):
        base = ORIGINAL_TRAIN_DATASET(*a, **k).map_with_index(with_scale(set()))
        return grain.MapDataset.source(_SkipOne(_SkipOne(base, 8), 8))

    monkeypatch.setattr(pipeline, "train_dataset", reference_dataset)
    ref = str(tmp_path / "ref")
    train_in_process(ref, text_file, **extra)
    a, b = (
        Checkpointer(os.path.join(spiky, "checkpoints")),
        Checkpointer(os.path.join(ref, "checkpoints")),
    )
    assert_trees_equal(
        a.read_arrays(16), b.read_arrays(16), "rolled-back run vs run without the data"
    )
    a.close()
    b.close()
