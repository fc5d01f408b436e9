"""Metrics to ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._f = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional
                self._tb = None

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
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
