"""Divergence bookkeeping: which batches the skipped (non-finite) steps saw, written to the workdir.

The train step already skips non-finite updates and counts them. When too many come in a row the
loop stops; ``divergence.json`` then names each offending step, the Grain iterator state before
its batch (``{"next_index": k}`` = batch k of the shuffled stream) and the window indices inside
the batch (token offsets = index * seq_len in the train split), so the data can be inspected or
skipped.

Optional loss-spike rollback (``config.fault.spike_factor``): a finite loss far above the recent
median restores the newest checkpoint from before the spike and continues the data stream after
the spiking batch, so the batches in between (the spike's included) are skipped, as PaLM did.
Each rollback is appended to ``rollbacks.jsonl``.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from lmtrain.errors import LmtrainError

REPORT_FILE = "divergence.json"


class TrainingDiverged(LmtrainError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


def batch_window_indices(
    num_windows: int,
    batch_size: int,
    seed: int,
    batch_index: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[int]:
    """Window ids in per-process batch ``batch_index``, mirroring ``pipeline.train_dataset``."""
    import grain

    ds = grain.MapDataset.range(num_windows)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
    return [int(i) for i in np.asarray(ds[batch_index])]


class BatchHistory:
    """The iterator state before each of the last ``n`` batches, keyed by the step they fed."""

    def __init__(self, n: int):
        self._items: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._n = max(n, 1)

    def record(self, step: int, iter_state: dict) -> None:
        self._items[step] = dict(iter_state)
        while len(self._items) > self._n:
            self._items.popitem(last=False)

    def get(self, step: int) -> dict | None:
        return self._items.get(step)


def write_report(
    workdir: str,
    *,
    step: int,
    skipped_steps: list[int],
    history: BatchHistory,
    window_lookup,
    last_checkpoint: int | None,
    nonfinite_total: int,
    index_key: str = "window_indices",
    extra: dict | None = None,
) -> str:
    """Writes ``divergence.json``; ``window_lookup(iter_state) -> list[int] | None``.

    ``index_key`` names what the lookup returns (``row_indices`` for fine-tuning records);
    ``extra`` adds top-level fields (which file those rows come from).
    """
    batches = []
    for s in skipped_steps:
        state = history.get(s)
        entry = {"step": s, "iter_state_before": state}
        if state is not None and "next_index" in state:
            entry["batch_index"] = int(state["next_index"])
            entry[index_key] = window_lookup(state)
        batches.append(entry)
    report = {
        "stopped_at_step": step,
        "nonfinite_in_a_row": len(skipped_steps),
        "nonfinite_total": nonfinite_total,
        "last_good_checkpoint": last_checkpoint,
        "offending_batches": batches,
        **(extra or {}),
    }
    path = os.path.join(workdir, REPORT_FILE)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


ROLLBACK_FILE = "rollbacks.jsonl"


class StepCounter:
    """``for step in StepCounter(start, end)`` that a loss-spike rollback can ``rewind``."""

    def __init__(self, start: int, end: int):
        self.next, self.end = start, end

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.next >= self.end:
            raise StopIteration
        self.next += 1
        return self.next - 1

    def rewind(self, step: int) -> None:
        self.next = step

    def skip(self, n: int) -> None:
        """The current call ran ``n`` steps past the one just yielded (several steps per call)."""
        self.next += n


class SpikeGuard:
    """Flags a loss above ``factor`` x the median of the last ``window`` finite losses.

    ``factor`` 0 turns it off. Spiking losses are not added to the window, so a run that keeps
    spiking keeps being compared with its last healthy losses.
    """

    def __init__(self, factor: float, window: int, max_rollbacks: int):
        self.factor, self.max_rollbacks = factor, max_rollbacks
        self.losses: collections.deque[float] = collections.deque(maxlen=max(window, 1))
        self.rollbacks = 0

    def median(self) -> float:
        return float(np.median(self.losses)) if self.losses else float("nan")

    def is_spike(self, loss: float) -> bool:
        if not np.isfinite(loss):
            return False  # non-finite steps are skipped by the step itself
        full = len(self.losses) == self.losses.maxlen
        if self.factor > 0 and full and loss > self.factor * self.median():
            return True
        self.losses.append(loss)
        return False


def log_rollback(workdir: str, record: dict) -> None:
    with open(os.path.join(workdir, ROLLBACK_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
