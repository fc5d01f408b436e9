"""Host-side speed: several steps per dispatch, and compiling ahead while the state loads.

None of these changes a number the run computes; they only cut the host's share of a step
(Python dispatch, per-call transfers, compiles on the critical path) for small models. The
XLA:CPU options of the jitted steps (``train.cpu_opt_level``) are set where they are jitted:
``lmtrain.train.step.cpu_compiler_options``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from lmtrain.data import pipeline
from lmtrain.train import finetune
from lmtrain.train.compile_ahead import CompileAhead, global_spec, with_shardings
from lmtrain.train.evaluation import eval_rows_per_process, sample_texts
from lmtrain.train.setup import Setup, to_global
from lmtrain.train.step import stacked_shardings


def dispatch_group(cfg) -> int:
    """``train.steps_per_dispatch``: the steps one call runs where ``dispatch_size`` allows."""
    return max(int(cfg.train.get("steps_per_dispatch", 1)), 1)


def dispatch_size(step: int, group: int, cfg) -> int:
    """Steps the call after ``step`` runs: ``group`` unless one of them but the last logs,
    evaluates or checkpoints, the run ends inside it, or the curriculum length changes in it; else 1.
    """
    t, d = cfg.train, cfg.data
    last = step + group  # the step count after the group
    if group <= 1 or last > t.steps:
        return 1
    for every in (t.log_every, t.eval_every, t.checkpoint_every):
        if (step // every + 1) * every < last:  # the next multiple falls inside the group
            return 1
    start_len = d.get("curriculum_start_len", 0)
    if start_len:
        length = lambda s: pipeline.curriculum_seq_len(  # noqa: E731
            s, start_len, d.get("curriculum_steps", 0), d.seq_len
        )
        if length(step) != length(last - 1):  # lengths only grow: equal ends, equal throughout
            return 1
    return group


def compiles_ahead(cfg) -> bool:
    """Token-shard pretraining in one process (no frozen trees, batches known up front)."""
    return (
        cfg.train.get("compile_ahead", True)
        and jax.process_count() == 1
        and not finetune.uses_records(cfg)
        and not finetune.lora_enabled(cfg)
        and cfg.objective == "lm"
    )


def start_compiles(ahead: CompileAhead, setup: Setup, train_step, eval_step, ds, start: int):
    """In threads: the first dispatch's train call (one step or a stack), the eval step and the
    end-of-run sampler (only process 0 samples)."""
    cfg = setup.config
    if start >= cfg.train.steps:
        return
    # dispatch_size never groups steps across a curriculum length change: one shape for all n
    n = dispatch_size(start, dispatch_group(cfg), cfg)
    example = ds[0]  # random access: the iterator the loop reads from is untouched
    first = pipeline.curriculum_batch(example, start, cfg.data)
    batch = global_spec(first, setup.batch_sharding, jax.process_count())
    state = with_shardings(setup.abstract_state, setup.shardings)
    ahead.start("train_step", lambda: train_step.compile_for(state, batch, None, n))
    rows = eval_rows_per_process(cfg)  # evals read full-length windows, as the train split's
    eval_rows = {
        k: np.zeros((rows, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in example.items()
    }
    eval_batch = global_spec(eval_rows, setup.batch_sharding, jax.process_count())
    ahead.start("eval_step", lambda: eval_step.compile_for(state.params, eval_batch))
    if cfg.train.samples and jax.process_index() == 0:  # the samples after the last step
        params = finetune.full_params(cfg, setup.abstract_state.params, None)
        ahead.start(
            "sampling",
            lambda: sample_texts(
                setup, params, cfg.train.samples, cfg.train.sample_tokens, compile_only=True
            ),
        )


def _shapes(batch: dict) -> dict:
    return {k: np.shape(v) for k, v in batch.items()}


class Dispatcher:
    """Runs the next step, or the next ``train.steps_per_dispatch`` steps in one call, and turns
    the device metrics of earlier calls into per-step host rows one call late (so dispatch
    never waits for the host); keeps the mean train loss over the log interval.

    ``source`` has ``batches`` (``next()`` and ``get_state()``) and ``rl`` (or None);
    ``record_batch(step, iter_state)`` is told the stream position before each batch.
    """

    def __init__(self, setup: Setup, train_step, source, record_batch: Callable[[int, dict], None]):
        self.cfg, self.setup, self.train_step = setup.config, setup, train_step
        self.source, self.record_batch = source, record_batch
        self.group = dispatch_group(self.cfg)
        self.stacked_sharding = stacked_shardings(setup.batch_sharding)
        self.loss_sum, self.loss_n, self.loss_last_step = 0.0, 0, -1

    def __call__(self, state, step: int, frozen):
        """(state, [(first step, steps, device metrics)]) after the next call or calls."""
        cfg, rl, batches = self.cfg, self.source.rl, self.source.batches
        n = dispatch_size(step, self.group, cfg)
        host = []
        for j in range(n):
            if rl is not None:
                rl.params = state.params  # the rollout samples from the current policy
            self.record_batch(step + j + 1, batches.get_state())
            # a few bucketed lengths under a sequence-length curriculum
            host.append(pipeline.curriculum_batch(next(batches), step + j, cfg.data))
        if n > 1 and all(_shapes(b) == _shapes(host[0]) for b in host):
            stacked = {k: np.stack([b[k] for b in host]) for k in host[0]}
            state, m = self.train_step.multi(
                state, to_global(stacked, self.stacked_sharding), frozen
            )
            return state, [(step + 1, n, m)]
        items = []
        for j, b in enumerate(host):  # one step per call (also batches of differing shapes)
            state, m = self.train_step(state, to_global(b, self.setup.batch_sharding), frozen)
            items.append((step + j + 1, 1, m))
        return state, items

    def flush(self, items) -> list[tuple[int, dict]]:
        """(step, metrics) per step of the dispatched calls; adds their losses to the log mean."""
        rows = []
        for first, n, device_metrics in items:
            host = jax.device_get(device_metrics)  # one transfer per call, not one per scalar
            for j in range(n):
                m = {k: float(v if np.ndim(v) == 0 else v[j]) for k, v in host.items()}
                rows.append((first + j, m))
        for step_done, m in rows:
            if step_done > self.loss_last_step and np.isfinite(m["loss"]):
                self.loss_sum += m["loss"]
                self.loss_n += 1
                self.loss_last_step = step_done
        return rows

    def take_loss_mean(self) -> float | None:
        """The mean finite train loss since the last call (None if none), and restart the mean."""
        mean = self.loss_sum / self.loss_n if self.loss_n else None
        self.loss_sum, self.loss_n = 0.0, 0
        return mean
