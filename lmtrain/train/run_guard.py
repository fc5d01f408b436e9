"""Run-directory trust: never lose or silently redo recorded progress, and say so when a run
goes bad.

- ``prepare_workdir``: creating ``--workdir`` (a file in the way, permissions) fails with one
  line, and ``workdir_errors`` turns any later OS error on a workdir file into one line too;
- ``refuse_silent_restart``: a workdir with progress on record (``metrics.jsonl`` past step 0,
  or checkpoints set aside as corrupt) but no usable checkpoint stops instead of training from
  step 0 again, unless ``config.fault.allow_restart``;
- ``set_aside_metrics``: on resume from step S (after a kill, or a fallback to an older
  checkpoint), records past S move to a side file, so ``metrics.jsonl`` keeps one record per
  step and kind when the resumed run logs those steps again;
- ``LossWatch``: warns on loss spikes by default (rollback stays opt-in via
  ``config.fault.spike_factor``) and when a run ends with its loss above where it started.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator

from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.train.divergence import SpikeGuard

METRICS_FILE = "metrics.jsonl"


# -- the workdir itself --------------------------------------------------------------------------
def prepare_workdir(workdir: str) -> None:
    """Create ``workdir``; a path that cannot be a folder gets one line naming the culprit."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _first_file_on_path(workdir)
        where = (
            "is a file"
            if blocker == os.path.abspath(workdir)
            else f"lies under the file {blocker!r}"
        )
        raise ConfigError(
            f"--workdir {workdir!r} {where}, not a folder; pass a folder path (it is created if "
            "missing)"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"--workdir {workdir!r}: cannot create it ({e.strerror or e}); pass a folder you can "
            "write to"
        ) from None
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir!r} is not a folder; pass a folder path")


def _first_file_on_path(path: str) -> str:
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i])
        if os.path.exists(p) and not os.path.isdir(p):
            return p
    return path


@contextlib.contextmanager
def workdir_errors(workdir: str) -> Iterator[None]:
    """An OS error on a file inside ``workdir`` (disk full, permissions, a file where a folder
    should be) becomes one ``CheckpointError`` line naming the file and the errno text."""
    root = os.path.abspath(workdir)
    try:
        yield
    except OSError as e:
        name = getattr(e, "filename", None)
        if not name or not _inside(str(name), root):
            raise
        raise CheckpointError(
            f"workdir {workdir!r}: {e.strerror or type(e).__name__} on {name!r} "
            f"(errno {e.errno}); free space or fix permissions there, then rerun to resume"
        ) from e


def _inside(path: str, root: str) -> bool:
    path = os.path.abspath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# -- progress on record ----------------------------------------------------------------------------
def _read_records(path: str) -> tuple[list[tuple[int | None, str]], int]:
    """[(step or None if unparseable, raw line)] and the largest step."""
    out, top = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                step = None
            out.append((step, line if line.endswith("\n") else line + "\n"))
            if step is not None:
                top = max(top, step)
    return out, top


def recorded_step(workdir: str) -> int:
    """The largest step in ``metrics.jsonl`` (0 if none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    return _read_records(path)[1]


def refuse_silent_restart(
    workdir: str, checkpoint_dir: str, allow_restart: bool, *, write: bool = True
) -> str | None:
    """Call when no usable checkpoint was found. Raises if the workdir shows progress, unless
    ``allow_restart``; then returns a note of what was set aside (or None: a fresh run)."""
    reasons = []
    step = recorded_step(workdir)
    if step > 0:
        reasons.append(f"{METRICS_FILE} records training up to step {step}")
    corrupt = checkpoint_dir.rstrip(os.sep) + ".corrupt"
    if os.path.isdir(corrupt) and os.listdir(corrupt):
        reasons.append(f"its checkpoints were set aside as corrupt in {corrupt}")
    if not reasons:
        return None
    if not allow_restart:
        why = " and ".join(reasons)
        raise CheckpointError(
            f"{workdir} has progress on record ({why}) but no usable checkpoint in "
            f"{checkpoint_dir}; refusing to restart from step 0. Restore the checkpoints, or "
            "rerun with --config.fault.allow_restart=True to start over (metrics.jsonl is then "
            "set aside)"
        )
    return set_aside_metrics(workdir, 0) if write else None


def set_aside_metrics(workdir: str, resumed_step: int) -> str | None:
    """Move records past ``resumed_step`` (and unreadable lines) to a side file; return a note."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    records, top = _read_records(path)
    later = [(s, line) for s, line in records if s is None or s > resumed_step]
    if not later:
        return None
    keep = [line for s, line in records if s is not None and s <= resumed_step]
    side = os.path.join(
        workdir, f"metrics.after-step-{resumed_step}.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    )
    with open(side, "a", encoding="utf-8") as f:
        f.writelines(line for _, line in later)
        f.flush()
        os.fsync(f.fileno())
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    steps = sorted({s for s, _ in later if s is not None})
    span = f"steps {steps[0]}-{steps[-1]}" if steps else "unreadable lines only"
    return (
        f"{METRICS_FILE}: moved {len(later)} record(s) past step {resumed_step} ({span}) to "
        f"{side}; the resumed run logs those steps again"
    )


def check_progress(
    workdir: str, checkpoint_dir: str, latest: int | None, allow_restart: bool
) -> str | None:
    """At start: resuming from ``latest`` sets later records aside; no checkpoint with progress
    on record stops (see ``refuse_silent_restart``). Only process 0 moves files."""
    import jax

    write = jax.process_index() == 0
    if latest is None:
        return refuse_silent_restart(workdir, checkpoint_dir, allow_restart, write=write)
    return set_aside_metrics(workdir, latest) if write else None


def last_checkpoint_phrase(last_saved: int | None) -> str:
    if last_saved is None:
        return (
            "no checkpoint was saved yet (rerun with --config.fault.allow_restart=True to "
            "start over)"
        )
    return f"the last good checkpoint is step {last_saved}"


# -- loss health -----------------------------------------------------------------------------------
class LossWatch:
    """Per-step train losses in; warnings out (never stops the run).

    Spike: a loss above ``spike_factor`` x the median of the last ``window`` finite losses (the
    same rule as the opt-in rollback). Trend: at the end, the median of the last ``k`` losses
    is above the median of the first ``k`` (the run got worse than its start: diverged).
    """

    MAX_SPIKE_LINES = 5

    def __init__(self, spike_factor: float, window: int, warn: Callable[[str], None], k: int = 5):
        self.spikes = SpikeGuard(spike_factor, window, 0) if spike_factor > 0 else None
        self.warn = warn
        self.k = k
        self.first: list[tuple[int, float]] = []
        self.last: collections.deque[tuple[int, float]] = collections.deque(maxlen=k)
        self.spike_count = 0
        self.warnings: list[str] = []

    def observe(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if len(self.first) < self.k:
            self.first.append((step, loss))
        self.last.append((step, loss))
        if self.spikes is not None and self.spikes.is_spike(loss):
            self.spike_count += 1
            msg = (
                f"warning: step {step}: loss {loss:.4f} is over {self.spikes.factor:g} x the median "
                f"{self.spikes.median():.4f} of the recent steps (a loss spike). Lower "
                "config.optim.lr, or set config.fault.spike_factor (e.g. 3) to roll back "
                "automatically"
            )
            if self.spike_count <= self.MAX_SPIKE_LINES:
                self.warn(
                    msg
                    + (
                        ""
                        if self.spike_count < self.MAX_SPIKE_LINES
                        else "; further spike warnings are counted in final_metrics.json"
                    )
                )
            if self.spike_count == 1:
                self.warnings.append(msg)

    def finish(self) -> list[str]:
        """Warnings for the end of the run (also printed); spike count included."""
        out = list(self.warnings)
        if self.spike_count > 1:
            out.append(f"{self.spike_count} loss spikes in total")
        if len(self.first) == self.k and self.last and self.last[0][0] > self.first[-1][0]:
            # Medians: one spiking step at either end is not a trend.
            start = statistics.median(v for _, v in self.first)
            end = statistics.median(v for _, v in self.last)
            if end > start:
                msg = (
                    f"warning: the training loss rose from {start:.4f} (median of steps "
                    f"{self.first[0][0]}-{self.first[-1][0]}) to {end:.4f} (steps "
                    f"{self.last[0][0]}-{self.last[-1][0]}): the run diverged; lower "
                    "config.optim.lr (or raise optim.warmup_steps) and start over"
                )
                self.warn(msg)
                out.append(msg)
        return out
