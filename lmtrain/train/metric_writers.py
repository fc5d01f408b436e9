"""Metric writers behind one interface: JSONL, TensorBoard and Weights & Biases.

``config.train.loggers`` names the writers a run uses; ``MetricsLogger``
(``lmtrain/train/metrics_log.py``) fans every ``write(step, metrics)`` out to them, so the
training loop never knows which are on. Each writer gets the run's resolved config
(``config.json``) and its run manifest (``run_manifest*.json``: code version, packages, data
hashes, seeds) once at start, then scalars per logged step.

Optional writers import their library lazily: ``tensorboard`` needs tensorboardX (skipped with
a warning when missing), ``wandb`` needs ``pip install 'lmtrain[wandb]'``. W&B reads its own
environment: ``WANDB_MODE=offline`` writes the run under ``<workdir>/wandb/`` without a network
(``wandb sync`` uploads it later), ``WANDB_PROJECT`` / ``WANDB_ENTITY`` choose where it goes.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import warnings
from typing import Any, Protocol

from lmtrain.errors import ConfigError

WRITERS = ("jsonl", "tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"


class MetricWriter(Protocol):
    def start(self, config: dict[str, Any], manifest: dict[str, Any]) -> None: ...

    def write(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_loggers(names) -> tuple[str, ...]:
    """``config.train.loggers`` as a tuple of known writer names (ConfigError otherwise)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in WRITERS]
    if bad or len(set(names)) != len(names):
        raise ConfigError(
            f"config.train.loggers={names!r}: use distinct names from {WRITERS}, e.g. "
            '("jsonl", "tensorboard", "wandb")'
        )
    return names


def read_run_files(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resolved config and the newest run manifest the run wrote ({} where missing)."""

    def load(path: str) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}

    manifests = sorted(glob.glob(os.path.join(workdir, "run_manifest*.json")), key=os.path.getmtime)
    config = load(os.path.join(workdir, "config.json"))
    return config, (load(manifests[-1]) if manifests else {})


class JsonlWriter:
    """``metrics.jsonl``: one JSON object per line (non-finite values already null)."""

    def __init__(self, workdir: str):
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

    def start(self, config, manifest) -> None:
        pass  # config.json and run_manifest.json already sit beside metrics.jsonl

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._f.write(json.dumps({"step": int(step), **metrics}) + "\n")

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Event files under ``<workdir>/tensorboard``; opened on a background thread.

    Why the thread: importing tensorboardX imports PyTorch when it is installed (about a
    second), which would otherwise sit on the training run's critical path before step one.
    """

    def __init__(self, workdir: str):
        self._tb = None
        self._pending: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._open, args=(os.path.join(workdir, "tensorboard"),), daemon=True
        )
        self._thread.start()

    def _open(self, directory: str) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard event files", stacklevel=2)
            return
        self._tb = SummaryWriter(directory)

    def _writer(self):
        if self._thread is not None:
            self._thread.join()  # long done by the first log line
            self._thread = None
        return self._tb

    def start(self, config, manifest) -> None:
        self._pending = {"config": config, "manifest": manifest}  # written with the first scalars

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        tb = self._writer()
        if tb is not None:
            for name, tree in self._pending.items():
                if tree:
                    tb.add_text(name, "```json\n" + json.dumps(tree, indent=2) + "\n```", 0)
            self._pending = {}
            for k, v in metrics.items():
                if isinstance(v, float):
                    tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        tb = self._writer()
        if tb is not None:
            tb.close()


class WandbWriter:
    """A Weights & Biases run: config = the resolved config plus ``manifest``, history = every
    scalar against the ``step`` metric (so a rollback or resume that logs a step again is kept,
    where W&B's own step counter would drop it). A resumed run continues the same W&B run (its
    id is kept in ``<workdir>/wandb_run_id``)."""

    def __init__(self, workdir: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                'config.train.loggers includes "wandb" but wandb is not installed: '
                "pip install 'lmtrain[wandb]' (or drop it from train.loggers)"
            ) from None
        self._wandb = wandb
        self._workdir = workdir
        self._run = None

    def start(self, config, manifest) -> None:
        wandb = self._wandb
        id_file = os.path.join(self._workdir, WANDB_ID_FILE)
        run_id = None
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip() or None
        self._run = wandb.init(
            dir=self._workdir,
            id=run_id,
            resume="allow" if run_id else None,
            name=os.path.basename(os.path.abspath(self._workdir)),
            config={**config, "manifest": manifest},
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        with open(id_file, "w") as f:
            f.write(self._run.id)
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if self._run is not None and scalars:
            self._run.log({"step": int(step), **scalars})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def make_writer(name: str, workdir: str) -> MetricWriter:
    return {"jsonl": JsonlWriter, "tensorboard": TensorBoardWriter, "wandb": WandbWriter}[name](
        workdir
    )
