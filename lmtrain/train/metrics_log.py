"""Training metrics fanned out to the writers ``config.train.loggers`` names
(``lmtrain/train/metric_writers.py``: metrics.jsonl, TensorBoard, Weights & Biases)."""

from __future__ import annotations

import math
import os

from lmtrain.train.metric_writers import check_loggers, make_writer, read_run_files

DEFAULT_LOGGERS = ("jsonl", "tensorboard")


class MetricsLogger:
    """One ``write(step, metrics)`` for every writer; non-finite values become null.

    The writers get the run's resolved config and manifest (read back from ``workdir``, where
    the loop wrote them) once, before the first metrics.
    """

    def __init__(self, workdir: str, enabled: bool = True, loggers=DEFAULT_LOGGERS):
        self.enabled = enabled
        self._writers = []
        if enabled:
            names = check_loggers(loggers)
            os.makedirs(workdir, exist_ok=True)
            self._writers = [make_writer(name, workdir) for name in names]
            config, manifest = read_run_files(workdir)
            for w in self._writers:
                w.start(config, manifest)

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
        for w in self._writers:
            w.write(step, clean)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []
