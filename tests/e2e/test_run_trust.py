"""Checkpoint trust and run-directory cases from issue 22, each with the message a user sees.

Tiny runs as in tests/e2e/test_fault.py (d_model 32, 2 layers, 24 steps, checkpoints at 8/16/24).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest

from lmtrain import cli
from lmtrain.config import load_config
from lmtrain.errors import CheckpointError
from lmtrain.train import loop, run_guard
from lmtrain.train.checkpoint import LISTING_FILE, METADATA_FILE, Checkpointer
from lmtrain.train.divergence import TrainingDiverged
from tests.e2e.test_fault import CONFIG, STEPS, _largest_file, _poison, tiny_overrides, write_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(str(tmp_path_factory.mktemp("text") / "tiny.txt"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_file):
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    loop.train(load_config(CONFIG, tiny_overrides(text_file)), workdir, print_fn=lambda *_: None)
    return workdir


def _copy(finished, tmp_path) -> tuple[str, str]:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    return workdir, os.path.join(workdir, "checkpoints")


def _train(workdir, text_file, **extra):
    printed: list[str] = []
    cfg = load_config(CONFIG, tiny_overrides(text_file, **extra))
    final = loop.train(cfg, workdir, print_fn=printed.append)
    return final, printed


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


# -- checkpoints ---------------------------------------------------------------------------------
def test_step_without_listing_is_refused_unless_accepted(finished, tmp_path, text_file):
    workdir, ckdir = _copy(finished, tmp_path)
    os.remove(os.path.join(ckdir, str(STEPS), LISTING_FILE))
    _flip(_largest_file(os.path.join(ckdir, str(STEPS), "state")))  # and nothing can tell

    with pytest.raises(CheckpointError) as e:
        _train(workdir, text_file)
    msg = str(e.value)
    assert f"step {STEPS} in {ckdir}: it has no file listing ({LISTING_FILE})" in msg
    assert "--config.fault.accept_unlisted_checkpoints=True" in msg
    assert str(STEPS) in os.listdir(ckdir)  # refused, not moved or deleted

    seen = []
    reader = Checkpointer(ckdir, report=seen.append)  # eval/generate: skip it, say why
    assert reader.latest_step() == 16
    reader.close()
    assert "skipping corrupt step 24" in seen[0] and "accept_unlisted_checkpoints" in seen[0]

    final, printed = _train(workdir, text_file, **{"fault.accept_unlisted_checkpoints": True})
    assert any(f"resumed from {ckdir} at step {STEPS}" in p for p in printed), printed
    assert final["step"] == STEPS


def test_top_level_metadata_is_covered(finished, tmp_path):
    workdir, ckdir = _copy(finished, tmp_path)
    listing = json.load(open(os.path.join(ckdir, str(STEPS), LISTING_FILE)))
    assert "item_handlers" in listing["metadata"] and "init_timestamp_nsecs" in listing["metadata"]
    meta_path = os.path.join(ckdir, str(STEPS), METADATA_FILE)
    meta = json.load(open(meta_path))
    meta["item_handlers"]["state"] = "some.other.Handler"
    json.dump(meta, open(meta_path, "w"))
    with open(os.path.join(ckdir, "16", METADATA_FILE), "w") as f:
        f.write('{"item_handlers": ')  # truncated
    seen = []
    ck = Checkpointer(ckdir, report=seen.append, owner=True)
    assert ck.latest_step() is None
    ck.close()
    assert f"{METADATA_FILE} field 'item_handlers' differs from {LISTING_FILE} (altered)" in seen[0]
    assert f"{METADATA_FILE} is unreadable (JSONDecodeError) (corrupted)" in seen[1]


def test_every_checkpoint_quarantined_stops_instead_of_restarting(finished, tmp_path, text_file):
    workdir, ckdir = _copy(finished, tmp_path)
    for step in ("16", str(STEPS)):
        _flip(_largest_file(os.path.join(ckdir, step, "state")))
    with pytest.raises(CheckpointError) as e:
        _train(workdir, text_file)
    assert str(e.value) == (
        f"{workdir} has progress on record (metrics.jsonl records training up to step {STEPS} "
        f"and its checkpoints were set aside as corrupt in {ckdir}.corrupt) but no usable "
        f"checkpoint in {ckdir}; refusing to restart from step 0. Restore the checkpoints, or "
        "rerun with --config.fault.allow_restart=True to start over (metrics.jsonl is then set "
        "aside)"
    )
    # Starting over is explicit, and the old records move to a side file.
    final, printed = _train(workdir, text_file, **{"fault.allow_restart": True, "train.steps": 4})
    assert final["step"] == 4
    (side,) = [n for n in os.listdir(workdir) if n.startswith("metrics.after-step-0.")]
    assert any(
        f"moved {len(_records(os.path.join(workdir, side)))} record(s)" in p for p in printed
    )
    steps = [
        r["step"] for r in _records(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r
    ]
    assert steps == [1, 2, 3, 4]


def test_checkpoints_folder_gone_stops(finished, tmp_path, text_file):
    workdir, ckdir = _copy(finished, tmp_path)
    shutil.rmtree(ckdir)
    with pytest.raises(CheckpointError, match=r"metrics.jsonl records training up to step 24\) "):
        _train(workdir, text_file)
    assert os.path.getsize(os.path.join(workdir, "metrics.jsonl")) > 0  # nothing lost


def test_fallback_sets_later_records_aside(finished, tmp_path, text_file):
    workdir, ckdir = _copy(finished, tmp_path)
    before = _records(os.path.join(workdir, "metrics.jsonl"))
    _flip(_largest_file(os.path.join(ckdir, str(STEPS), "state")))
    final, printed = _train(workdir, text_file)
    assert final["step"] == STEPS
    (side,) = [n for n in os.listdir(workdir) if n.startswith("metrics.after-step-16.")]
    moved = _records(os.path.join(workdir, side))
    assert moved == [r for r in before if r["step"] > 16]
    note = f"metrics.jsonl: moved {len(moved)} record(s) past step 16 (steps 17-24) to "
    assert any(p.startswith(note) for p in printed), printed
    after = _records(os.path.join(workdir, "metrics.jsonl"))
    train_steps = [r["step"] for r in after if "train/loss" in r]
    assert train_steps == list(range(1, STEPS + 1))  # one record per step


# -- workdir -----------------------------------------------------------------------------------
@pytest.mark.parametrize("under", [False, True])
def test_workdir_that_is_a_file_gets_one_line(tmp_path, text_file, capsys, under):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    workdir = str(blocker / "run") if under else str(blocker)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", CONFIG, "--workdir", workdir])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    where = f"lies under the file {str(blocker)!r}" if under else "is a file"
    assert err == (
        f"lmtrain: error: --workdir {workdir!r} {where}, not a folder; pass a folder path (it is "
        "created if missing)"
    )
    assert blocker.read_text() == "keep me"


def test_os_error_inside_the_workdir_is_one_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with pytest.raises(CheckpointError) as e:
        with run_guard.workdir_errors(str(tmp_path)):
            raise OSError(errno.ENOSPC, "No space left on device", path)
    assert str(e.value) == (
        f"workdir {str(tmp_path)!r}: No space left on device on {path!r} (errno 28); free space "
        "or fix permissions there, then rerun to resume"
    )
    with pytest.raises(FileNotFoundError):  # errors elsewhere keep their own type
        with run_guard.workdir_errors(str(tmp_path)):
            open(str(tmp_path.parent / "nope" / "x"))


# -- loss health --------------------------------------------------------------------------------
def test_spike_warning_is_on_by_default():
    assert load_config(CONFIG, []).fault.spike_warn_factor == 3.0
    warned: list[str] = []
    watch = run_guard.LossWatch(3.0, window=10, warn=warned.append)
    rng = np.random.default_rng(0)
    for step, loss in enumerate(2.0 + 0.05 * rng.standard_normal(30), 1):
        watch.observe(step, float(loss))
    assert warned == []
    watch.observe(31, 9.0)
    assert len(warned) == 1 and warned[0].startswith("warning: step 31: loss 9.0000 is over 3 x")
    assert "config.fault.spike_factor (e.g. 3) to roll back" in warned[0]
    assert watch.finish() == [warned[0]]  # one spike, and the run still ends lower than it began


def test_climbing_loss_finishes_with_a_warning(tmp_path, text_file):
    final, printed = _train(str(tmp_path / "run"), text_file, **{"optim.lr": 3.0})
    (msg,) = [w for w in final["warnings"] if "training loss rose" in w]
    assert msg.startswith("warning: the training loss rose from ")
    assert "the run diverged; lower config.optim.lr" in msg
    assert msg in printed


def test_divergence_message_without_a_checkpoint(tmp_path, text_file, monkeypatch):
    from lmtrain.data import pipeline

    monkeypatch.setattr(pipeline, "train_dataset", _poison({0, 1, 2, 3}))
    with pytest.raises(TrainingDiverged) as e:
        _train(str(tmp_path / "run"), text_file, **{"train.max_nonfinite_in_a_row": 3})
    assert "None" not in str(e.value)
    assert (
        "no checkpoint was saved yet (rerun with --config.fault.allow_restart=True to start "
        "over)" in str(e.value)
    )
