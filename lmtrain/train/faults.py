"""A run's fault handling behind one interface: the non-finite guard, loss-spike rollback,
loss warnings and preemption signals.

The train step itself skips non-finite updates; ``Faults.check`` reads the per-step metrics
after each call and stops the run after ``train.max_nonfinite_in_a_row`` skipped steps
(naming the batches in ``divergence.json``), rolls back to the newest checkpoint before a loss
spike (``fault.spike_factor``), or only warns (``run_guard.LossWatch``). ``interrupt`` turns a
SIGTERM/SIGINT caught by ``signals.PreemptionGuard`` into a checkpoint and
``TrainingInterrupted``.
"""

from __future__ import annotations

import os

import jax

from lmtrain.data import pipeline
from lmtrain.rl_config import RL_OBJECTIVES
from lmtrain.train import divergence, finetune, run_guard
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.lora_io import save_adapters
from lmtrain.train.setup import Setup
from lmtrain.train.signals import PreemptionGuard, TrainingInterrupted
from lmtrain.train.sources import Source


class Faults:
    """State of the run's fault handling: the batches' stream positions, the spike and loss
    watches, the non-finite streak and the newest step saved (``last_saved``)."""

    def __init__(
        self,
        setup: Setup,
        workdir: str,
        ckpt: Checkpointer,
        source: Source,
        guard: PreemptionGuard,
        *,
        last_saved: int | None,
        group: int,
        print_fn,
    ):
        cfg = setup.config
        self.setup, self.cfg, self.workdir = setup, cfg, workdir
        self.ckpt, self.source, self.guard, self.print_fn = ckpt, source, guard, print_fn
        self.history = divergence.BatchHistory(cfg.train.max_nonfinite_in_a_row + 2 + 2 * group)
        self.spikes = divergence.SpikeGuard(
            cfg.fault.spike_factor, cfg.fault.spike_window, cfg.fault.max_rollbacks
        )
        # with rollback on, the rollback says it
        warn_factor = 0.0 if cfg.fault.spike_factor else cfg.fault.spike_warn_factor
        # An RL loss is advantage-weighted: it sits near zero, changes sign and need not fall, so
        # spikes over its median and a rise from its start say nothing about the run.
        watched = cfg.objective not in RL_OBJECTIVES
        self.watch = (
            run_guard.LossWatch(warn_factor, cfg.fault.spike_window, print_fn) if watched else None
        )
        self.last_saved = last_saved
        self.streak = 0  # skipped (non-finite) steps in a row

    def record_batch(self, step: int, iter_state: dict) -> None:
        """The stream position before the batch of ``step`` (to name or skip it later)."""
        self.history.record(step, iter_state)

    @property
    def requested(self) -> bool:
        """A preemption signal arrived: save and stop after this call."""
        return self.guard.requested

    def check(self, rows: list[tuple[int, dict]], state, close) -> object | None:
        """Per-step metrics in; raises ``TrainingDiverged`` after too many non-finite steps in a
        row (``close()`` first releases the run's files); returns the restored state after a
        loss-spike rollback (the rest of ``rows`` is then dropped), else None."""
        for s, m in rows:
            # Counted from the per-step metrics, not the state: the state is a call or two ahead
            # and a streak that ends inside that lag would otherwise go unseen.
            self.streak = self.streak + 1 if m["skipped"] else 0
            if self.watch is not None:
                self.watch.observe(s, m["loss"])
            if self.streak >= self.cfg.train.max_nonfinite_in_a_row:
                close()
                self._stop_diverged(state, s, self.streak)
            if self.spikes.is_spike(m["loss"]):
                state = self._rollback(s, m["loss"], state)
                self.streak = 0
                return state
        return None

    def save(self, done: int, state) -> None:
        """Checkpoint step ``done`` (and LoRA adapters) unless non-finite steps are in progress:
        the last good checkpoint is kept then."""
        if int(state.nonfinite_in_a_row) > 0:
            self.print_fn(
                f"step {done}: not checkpointing during {int(state.nonfinite_in_a_row)} non-finite steps"
            )
            return
        self.ckpt.save(done, state, self.source.batches.get_state(), force=True)
        self.last_saved = done
        if finetune.lora_enabled(self.cfg) and jax.process_index() == 0:
            save_adapters(
                os.path.join(self.workdir, "adapters"),
                jax.device_get(state.params),
                self.cfg,
                step=done,
            )

    def save_if_new(self, done: int, state) -> None:
        """Checkpoint ``done`` unless it is saved already."""
        if self.last_saved != done:
            self.ckpt.save(done, state, self.source.batches.get_state(), force=True)
            self.last_saved = done

    def interrupt(self, done: int, state, close) -> None:
        """A signal arrived: save ``done`` (if its state is finite), ``close()`` and raise."""
        if self.last_saved != done and int(state.nonfinite_in_a_row) == 0:
            self.save_if_new(done, state)
        close()
        last = self.last_saved
        raise TrainingInterrupted(
            f"{self.guard.name} received: stopped at step {done}; "
            + (
                f"the newest checkpoint is step {last} in {self.ckpt.directory}. Run the same "
                "command to resume."
                if last is not None
                else run_guard.last_checkpoint_phrase(None) + "."
            ),
            self.guard.signum,
        )

    def finish(self) -> list[str]:
        """The end-of-run loss warnings (printed too)."""
        return self.watch.finish() if self.watch is not None else []

    def _rollback(self, s: int, loss: float, state):
        """Loss spike at step s: restore the newest checkpoint before s, resume data after
        batch s; ``last_saved`` becomes the step the run continues from."""
        ckpt, spikes, print_fn = self.ckpt, self.spikes, self.print_fn
        ckpt.wait()
        before = [k for k in ckpt.all_steps() if k < s and ckpt.verify(k) is None]
        if not before:
            print_fn(
                f"step {s}: loss {loss:.4f} spiked (> {spikes.factor} x median {spikes.median():.4f}) "
                "but no checkpoint precedes it; continuing"
            )
            self.last_saved = ckpt.latest_step()
            return state
        spikes.rollbacks += 1
        if spikes.rollbacks > spikes.max_rollbacks:
            ckpt.close()
            self.source.close()
            raise divergence.TrainingDiverged(
                f"loss spiked {spikes.rollbacks} times (config.fault.max_rollbacks={spikes.max_rollbacks}); last at "
                f"step {s}: {loss:.4f} vs median {spikes.median():.4f}. See {divergence.ROLLBACK_FILE}; lower "
                "config.optim.lr or raise config.fault.spike_factor"
            )
        target = max(before)
        for k in ckpt.all_steps():
            if k > target:  # taken after the spike's update: not a state to keep
                ckpt.delete(k)
        state, saved_iter = ckpt.restore(target, self.setup.abstract_state, self.setup.shardings)
        resume_iter = self.history.get(s + 1)  # the stream just after the spiking batch
        self.source.reopen(resume_iter)
        self._log_rollback(s, loss, target, saved_iter, resume_iter)
        print_fn(
            f"step {s}: loss {loss:.4f} > {spikes.factor} x median {spikes.median():.4f}; rolled back to step "
            f"{target} and skipped the data up to the spike (rollback {spikes.rollbacks}/{spikes.max_rollbacks})"
        )
        self.last_saved = target
        return state

    def _log_rollback(self, s, loss, target, saved_iter, resume_iter) -> None:
        record = {
            "step": s,
            "loss": loss,
            "median": self.spikes.median(),
            "factor": self.spikes.factor,
            "restored_step": target,
            "iter_state_restored": saved_iter,
            "iter_state_resumed": resume_iter,
        }
        if "next_index" in saved_iter and "next_index" in resume_iter:
            record["skipped_batch_indices"] = list(
                range(int(saved_iter["next_index"]), int(resume_iter["next_index"]))
            )
        if jax.process_index() == 0:
            divergence.log_rollback(self.workdir, record)

    def _stop_diverged(self, state, done: int, n: int) -> None:
        """Too many non-finite steps in a row: keep the last good checkpoint, name the batches,
        stop. Token-shard runs name the windows of the train split; fine-tuning records runs
        (same shuffle/batch structure) name the rows of ``data.train_file``."""
        cfg = self.cfg
        num_items, index_key, extra = self._batch_items()

        def items(iter_state):
            return divergence.batch_window_indices(
                num_items,
                cfg.train.global_batch_size // jax.process_count(),
                cfg.seed,
                int(iter_state["next_index"]),
                jax.process_index(),
                jax.process_count(),
            )

        path = os.path.join(self.workdir, divergence.REPORT_FILE)
        if jax.process_index() == 0:
            divergence.write_report(
                self.workdir,
                step=done,
                skipped_steps=list(range(done - n + 1, done + 1)),
                history=self.history,
                window_lookup=items,
                last_checkpoint=self.last_saved,
                nonfinite_total=int(state.nonfinite_total),
                index_key=index_key,
                extra=extra,
            )
        raise divergence.TrainingDiverged(
            f"{n} non-finite steps in a row (config.train.max_nonfinite_in_a_row) ending at step {done}; "
            f"the offending batches are listed in {path}; {run_guard.last_checkpoint_phrase(self.last_saved)}. "
            "Lower config.optim.lr or inspect/remove that data before resuming (a resume replays it)."
        )

    def _batch_items(self) -> tuple[int, str, dict | None]:
        """(items the train batches are drawn from, what divergence.json calls their indices,
        extra report fields)."""
        cfg = self.cfg
        if finetune.uses_records(cfg):
            extra = {
                "train_file": os.path.abspath(cfg.data.train_file),
                "row_indices": (
                    "rows of finetune_data.rows_for_objective(config, tokenizer, train_file): one record per row, "
                    "except packed SFT rows, which hold several"
                ),
            }
            return self.source.num_records, "row_indices", extra
        train_dir = os.path.join(self.setup.data_dir, cfg.data.train_split)
        num_items = (pipeline.TokenStream(train_dir).num_tokens - 1) // cfg.data.seq_len
        return num_items, "window_indices", None
