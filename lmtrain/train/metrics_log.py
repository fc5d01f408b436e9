"""Metrics to ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import threading


def _open_tensorboard(directory: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional
        return None
    return SummaryWriter(directory)


class MetricsLogger:
    """``metrics.jsonl`` is written at once; TensorBoard opens on a background thread.

    Why the thread: importing tensorboardX imports PyTorch when it is installed (about a second),
    which would otherwise sit on the training run's critical path before the first step.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._f = None
        self._tb = None
        self._tb_thread = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            self._tb_thread = threading.Thread(
                target=self._open, args=(os.path.join(workdir, "tensorboard"),), daemon=True
            )
            self._tb_thread.start()

    def _open(self, directory: str) -> None:
        self._tb = _open_tensorboard(directory)

    def _tensorboard(self):
        if self._tb_thread is not None:
            self._tb_thread.join()  # long done by the first log line
            self._tb_thread = None
        return self._tb

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {
            k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
            for k, v in metrics.items()
        }
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in clean.items()
        }
        self._f.write(json.dumps({"step": int(step), **clean}) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._f:
            self._f.close()
        tb = self._tensorboard() if self.enabled else None
        if tb is not None:
            tb.close()
