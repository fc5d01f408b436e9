"""Early stopping on a validation metric, and keeping the best checkpoint by a metric.

Both are driven by the eval results the loop already computes (``{"eval/loss": ...}``) and keep
their state in small JSON files in the workdir, so a resumed run remembers its best value and
how many evaluations it has gone without improving.
"""

from __future__ import annotations

import json
import math
import os

from lmtrain.errors import ConfigError
from lmtrain.train.checkpoint import Checkpointer

EARLY_STOP_FILE = "early_stop.json"
BEST_FILE = "best.json"
BEST_DIR = "checkpoints_best"
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "bits_per_byte", "error")


def resolve_mode(metric: str, mode: str) -> str:
    """``min``/``max`` as given, or from the name for ``auto`` (losses/perplexity → min)."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ConfigError(f"mode {mode!r} must be auto, min or max")
    return "min" if any(p in metric.lower() for p in _LOWER_IS_BETTER) else "max"


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _metric(metrics: dict, name: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"metric {name!r} is not among the eval results {sorted(metrics)}; set the config "
            "key to one of them (e.g. eval/loss)"
        )
    return float(metrics[name])


def _load(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


class EarlyStopper:
    """Stop after ``patience`` evaluations in a row without an improvement > ``min_delta``.

    A non-finite value never counts as an improvement.
    """

    def __init__(
        self,
        workdir: str,
        patience: int,
        *,
        metric: str = "eval/loss",
        mode: str = "auto",
        min_delta: float = 0.0,
    ):
        if patience < 1:
            raise ConfigError(f"early stopping patience must be >= 1, got {patience}")
        self.path = os.path.join(workdir, EARLY_STOP_FILE)
        self.patience, self.metric, self.min_delta = patience, metric, min_delta
        self.mode = resolve_mode(metric, mode)
        state = _load(self.path)
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))

    def update(self, step: int, metrics: dict) -> bool:
        """Record one evaluation; True when training should stop."""
        value = _metric(metrics, self.metric)
        if math.isfinite(value) and _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, int(step), 0
        else:
            self.bad_evals += 1
        _save(
            self.path,
            {
                "metric": self.metric,
                "mode": self.mode,
                "best": self.best,
                "best_step": self.best_step,
                "bad_evals": self.bad_evals,
            },
        )
        return self.bad_evals >= self.patience


class BestCheckpointKeeper:
    """Saves the train state to ``<workdir>/checkpoints_best`` whenever ``metric`` improves.

    ``lmtrain eval --step best`` and ``load_run(workdir, "best")`` read it back.
    """

    def __init__(self, workdir: str, metric: str, *, mode: str = "auto"):
        self.metric, self.mode = metric, resolve_mode(metric, mode)
        self.info_path = os.path.join(workdir, BEST_FILE)
        info = _load(self.info_path)
        self.best = info.get("value") if info.get("metric") == metric else None
        self.ckpt = Checkpointer(os.path.join(workdir, BEST_DIR), keep=1, async_save=False)

    def update(self, step: int, metrics: dict, state, iter_state: dict | None = None) -> bool:
        """Save ``state`` if ``metrics[metric]`` is the best so far; True when it saved."""
        value = _metric(metrics, self.metric)
        if not (math.isfinite(value) and _improved(value, self.best, self.mode, 0.0)):
            return False
        self.ckpt.save(step, state, iter_state, force=True)
        self.best = value
        _save(
            self.info_path,
            {"metric": self.metric, "mode": self.mode, "value": value, "step": int(step)},
        )
        return True

    def close(self) -> None:
        self.ckpt.close()


class EvalHooks:
    """What the train loop calls after each evaluation (a no-op unless configured).

    ``train.early_stop_patience`` > 0 turns on early stopping on ``train.early_stop_metric``;
    ``train.keep_best_metric`` (e.g. ``eval/loss``) keeps the best checkpoint by that metric.
    """

    def __init__(self, train_cfg, workdir: str):
        t = train_cfg
        self.stopper = None
        self.keeper = None
        if t.early_stop_patience:
            self.stopper = EarlyStopper(
                workdir,
                int(t.early_stop_patience),
                metric=t.early_stop_metric,
                min_delta=float(t.early_stop_min_delta),
            )
        if t.keep_best_metric:
            self.keeper = BestCheckpointKeeper(workdir, t.keep_best_metric, mode=t.keep_best_mode)

    def after_eval(self, step: int, metrics: dict, state, iter_state: dict | None) -> bool:
        """Keep the best checkpoint if it improved; True when training should stop early."""
        if self.keeper is not None:
            self.keeper.update(step, metrics, state, iter_state)
        return self.stopper is not None and self.stopper.update(step, metrics)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
