"""The training loop: set up, resume or init, step, log, evaluate, checkpoint, sample.

``train(config, workdir)`` is the single entry point used by the CLI, tests and notebooks. It
runs a ``Trainer``: the run's state in one object, ``fit`` stepping it and calling ``_log``,
``_eval`` and the checkpoint/interrupt/fault handling of ``faults.Faults``; the host-side speed
tricks (several steps per call, compiling ahead) live in ``speed``, what a run is built from
in ``setup``, evaluation and samples in ``evaluation``.
"""

from __future__ import annotations

import json
import os
import time

import jax

from lmtrain import host_devices
from lmtrain.distributed import maybe_initialize
from lmtrain.train import compile_cache, divergence, finetune, run_guard, speed
from lmtrain.train import flops as flops_lib
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.compile_ahead import CompileAhead
from lmtrain.train.early_stop import EvalHooks
from lmtrain.train.evaluation import eval_rows_per_process, evaluate, evaluate_rows, sample_texts
from lmtrain.train.faults import Faults
from lmtrain.train.losses.dpo import DegenerateRunMonitor
from lmtrain.train.metrics_log import MetricsLogger
from lmtrain.train.optim import warmup_note
from lmtrain.train.preflight import run_preflight
from lmtrain.train.run_info import write_run_files
from lmtrain.train.setup import (
    Setup,
    build,
    build_layout,
    resolve_data,
    step_functions,
    to_global,
    token_dataset,
)
from lmtrain.train.signals import PreemptionGuard, TrainingInterrupted
from lmtrain.train.sources import open_source
from lmtrain.train.speed import dispatch_group, dispatch_size
from lmtrain.train.state import init_state


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(config, workdir: str, *, print_fn=print) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the final metrics.

    SIGTERM/SIGINT save the current step and raise ``TrainingInterrupted`` (rerun to resume).
    """
    with PreemptionGuard() as guard, run_guard.workdir_errors(workdir):
        return Trainer(config, workdir, print_fn=print_fn, guard=guard).fit()


class Trainer:
    """One run in ``workdir``: built, restored (or initialised) on construction; ``fit`` trains
    it to ``train.steps`` (or an early stop) and returns the final metrics."""

    def __init__(self, config, workdir: str, *, print_fn, guard: PreemptionGuard):
        jax.config.update("jax_threefry_partitionable", True)
        compile_cache.enable(config.train.get("compilation_cache_dir", ""))
        maybe_initialize(config.distributed)  # before anything (preflight too) touches the backend
        run_guard.prepare_workdir(workdir)
        self.is_main = jax.process_index() == 0
        if config.fault.preflight:
            run_preflight(config, workdir, print_fn=print_fn if self.is_main else None)
        self.setup = build(config, workdir)
        self.cfg, self.workdir, self.print_fn, self.guard = (
            self.setup.config,
            workdir,
            print_fn,
            guard,
        )
        self.ckpt = self._checkpointer()
        latest = self.ckpt.latest_step()
        note = run_guard.check_progress(
            workdir, self.ckpt.directory, latest, self.cfg.fault.allow_restart
        )
        if note and self.is_main:
            print_fn(note)
        self.ahead = CompileAhead()
        self._prepare(latest)

    def _checkpointer(self) -> Checkpointer:
        cfg = self.cfg
        return Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            keep=cfg.train.keep_checkpoints,
            async_save=cfg.train.async_checkpoint,
            hash_files=cfg.fault.checkpoint_hashes,
            report=self.print_fn if self.is_main else (lambda _: None),
            owner=True,
            accept_unlisted=cfg.fault.accept_unlisted_checkpoints,
        )

    def _prepare(self, latest: int | None) -> None:
        """State, data, step functions, logger and fault handling of the run from ``latest``."""
        cfg, setup = self.cfg, self.setup
        # Plain pretraining: build the data and step functions first and compile the first train
        # call, the eval step and the sampler in background threads while the state initialises
        # or restores.
        early, ds = speed.compiles_ahead(cfg), None
        if early:
            ds = token_dataset(cfg, setup)
            step_fns = step_functions(setup, None, None)
            speed.start_compiles(self.ahead, setup, *step_fns, ds, latest or 0)
        iter_state, initial, frozen_shardings, extras = self._restore_or_init(latest)
        if self.is_main:
            write_run_files(
                self.workdir,
                cfg,
                data_dir=setup.data_dir,
                tokenizer_fingerprint=setup.tokenizer.fingerprint(),
                mesh_shape=setup.mesh.devices.shape,
                resumed_from=latest,
            )
        self.source = open_source(
            setup, self.frozen, iter_state, initial, self.workdir, self.print_fn, ds
        )
        if not early:
            step_fns = step_functions(setup, frozen_shardings, extras)
        self.train_step, self.eval_step = step_fns
        # before the loop's calls: one program must not compile twice at once (the sampling
        # programs are only needed after the last step)
        self.ahead.wait("train_step", "eval_step")
        self.dpo_monitor = (
            DegenerateRunMonitor(cfg.dpo.degenerate_patience, warn=self.print_fn)
            if cfg.objective == "dpo"
            else None
        )
        self.logger = MetricsLogger(self.workdir, enabled=self.is_main, loggers=cfg.train.loggers)
        self._announce()
        self.faults = Faults(
            setup,
            self.workdir,
            self.ckpt,
            self.source,
            self.guard,
            last_saved=latest,
            group=dispatch_group(cfg),
            print_fn=self.print_fn,
        )
        self.dispatch = speed.Dispatcher(
            setup, self.train_step, self.source, self.faults.record_batch
        )
        self.eval_hooks = EvalHooks(cfg.train, self.workdir)  # early stop / keep best

    def _restore_or_init(self, latest: int | None) -> tuple:
        """Sets ``state`` and ``frozen``; returns (iter_state, initial params, frozen
        shardings, objective extras)."""
        cfg, setup = self.cfg, self.setup
        iter_state = None
        if latest is not None:
            state, iter_state = self.ckpt.restore(latest, setup.abstract_state, setup.shardings)
            self.print_fn(f"resumed from {self.ckpt.directory} at step {latest}")
        else:
            state, _ = init_state(
                setup.model,
                setup.tx,
                cfg.data.seq_len,
                cfg.seed,
                setup.mesh,
                setup.params_transform,
                setup.shardings,
            )
        initial, initial_shardings = None, None
        if finetune.needs_initial_params(cfg):
            initial, initial_shardings = finetune.initial_params(setup)
            if latest is None:
                state = finetune.start_state(setup, state, initial)
        self.state = state
        self.frozen, frozen_shardings, extras = finetune.frozen_trees(
            setup, setup.tokenizer, initial, initial_shardings
        )
        return iter_state, initial, frozen_shardings, extras

    def _announce(self) -> None:
        """The run's throughput figures, its start line and the fit statistics of its data."""
        cfg, setup = self.cfg, self.setup
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        flops_per_token = flops_lib.flops_per_token(setup.model_cfg, cfg.data.seq_len)
        self.flops_per_step = flops_per_token * self.tokens_per_step
        self.peak = cfg.train.peak_flops or flops_lib.device_peak_flops()
        start = int(self.state.step)
        if self.source.fit_metrics:
            self.logger.write(start, self.source.fit_metrics)
        self.print_fn(
            f"model: {setup.model_cfg.param_count():,} params | mesh {dict(setup.mesh.shape)} | "
            f"{jax.device_count()} devices | batch {cfg.train.global_batch_size}x{cfg.data.seq_len}"
            f" | steps {start}->{cfg.train.steps}"
            + host_devices.console_note(jax.default_backend())
        )
        if note := warmup_note(cfg.optim, cfg.train.steps):
            self.print_fn(note)

    def _due(self, done: int, every: int) -> bool:
        return done % every == 0 or done == self.cfg.train.steps

    def fit(self) -> dict:
        """Steps to ``train.steps``; logs, evaluates, checkpoints; returns the final metrics."""
        t = self.cfg.train
        self.pending = []  # [(first step, steps, device metrics)] fetched one dispatch late
        self.t_last, self.steps_since, self.final = time.perf_counter(), 0, {}
        self.t_start = self.t_last
        self.steps = divergence.StepCounter(int(self.state.step), t.steps)
        for step in self.steps:
            self.state, items = self.dispatch(self.state, step, self.frozen)
            n = sum(item[1] for item in items)
            self.steps.skip(n - 1)
            done = step + n
            prev, self.pending = self.pending, items
            self.steps_since += n
            if self._due(done, t.checkpoint_every) or self.faults.requested:
                # A checkpoint may follow: check the newest steps too, so none is saved after a
                # non-finite streak that is only seen later (the save waits for this state anyway).
                prev, self.pending = prev + self.pending, []
            rows = self.dispatch.flush(prev)
            restored = self.faults.check(rows, self.state, self._close)
            if restored is not None:  # a loss-spike rollback: continue from its checkpoint
                self.state = restored
                self.steps.rewind(self.faults.last_saved)
                self.pending, self.steps_since, self.t_last = [], 0, time.perf_counter()
                continue
            if self._due(done, t.log_every):
                self._log(done, rows)
            stop_early = self._eval(done)
            if self._due(done, t.checkpoint_every):
                self.faults.save(done, self.state)
            if self.faults.requested and done < t.steps:
                self.faults.interrupt(done, self.state, self._close)
            if stop_early:
                self._stop_early(done)
                break
        return self._finish()

    def _log(self, done: int, rows: list[tuple[int, dict]]) -> None:
        """The newest step's metrics, with step time, throughput and MFU since the last log."""
        cfg = self.cfg
        s, m = (self.dispatch.flush(self.pending) if self.pending else rows)[-1]
        now = time.perf_counter()
        dt = (now - self.t_last) / max(self.steps_since, 1)
        self.t_last, self.steps_since = now, 0
        if (loss_avg := self.dispatch.take_loss_mean()) is not None:
            m["loss_avg"] = loss_avg
        if self.source.rl is not None:
            m.update(self.source.rl.metrics())
        peak = self.peak * jax.device_count()
        m.update(
            {
                "step_time_s": dt,
                "tokens_per_s": self.tokens_per_step / dt,
                "mfu": self.flops_per_step / dt / peak if peak else 0.0,
            }
        )
        self.logger.write(s, {f"train/{k}": v for k, v in m.items()})
        eta = dt * (cfg.train.steps - done)
        self.print_fn(
            f"step {s:>6}/{cfg.train.steps} | loss {m.get('loss_avg', m['loss']):.4f} | gnorm {m['grad_norm']:.3f} | "
            f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {dt * 1e3:.1f} ms/step | "
            f"MFU {100 * m['mfu']:.1f}% | ETA {_fmt_time(eta)}"
        )
        self.final.update({f"train/{k}": v for k, v in m.items()})
        if self.dpo_monitor is not None:
            self.dpo_monitor.update(s, m)

    def _eval(self, done: int) -> bool:
        """Evaluates when due; returns whether the run stops early."""
        cfg, rl = self.cfg, self.source.rl
        if not self._due(done, cfg.train.eval_every):
            return False
        if rl is not None and rl.has_eval:
            ev = rl.evaluate(self.state.params, done)
            self.logger.write(done, ev)
            self.final.update(ev)
            self.print_fn(
                f"step {done:>6} | eval reward {ev['eval/reward']:.4f} | eval KL {ev.get('eval/kl', float('nan')):.4f}"
            )
            return False
        if finetune.uses_records(cfg) and self.setup.eval_rows is None:  # no eval_file
            return False
        # Every periodic eval reads the same first train.eval_batches batches, so its points
        # compare; the final eval over the whole split is a series of its own (eval_full/*),
        # never joined to them, and the eval/* that final_metrics.json reports.
        params = self.state.params
        ev = evaluate(self.setup, self.eval_step, params, cfg.train.eval_batches, self.frozen)
        full, whole = {}, {}
        if done == cfg.train.steps:
            whole = ev
            if cfg.train.eval_batches:  # the periodic evals were capped: read it all once
                whole = evaluate(self.setup, self.eval_step, params, 0, self.frozen)
            full = {k.replace("eval/", "eval_full/", 1): v for k, v in whole.items()}
            self.print_fn(f"step {done:>6} | whole-split eval loss {whole['eval/loss']:.4f}")
        self.logger.write(done, ev | full)
        self.final.update(ev | full | whole)
        stop = self.eval_hooks.after_eval(done, ev, self.state, self.source.batches.get_state())
        self.print_fn(
            f"step {done:>6} | eval loss {ev['eval/loss']:.4f} | eval ppl {ev.get('eval/perplexity', float('nan')):.2f}"
        )
        return stop

    def _stop_early(self, done: int) -> None:
        self.faults.save_if_new(done, self.state)
        t = self.cfg.train
        self.print_fn(
            f"step {done}: early stop, {t.early_stop_metric} has not improved for "
            f"{t.early_stop_patience} evaluations"
        )
        self.final["early_stopped_at"] = done

    def _close(self) -> None:
        """Release the run's checkpointer, data stream and metric writers (before raising)."""
        self.ckpt.close()
        self.source.close()
        self.logger.close()

    def _finish(self) -> dict:
        """Final metrics (``final_metrics.json``), the end-of-run samples, files closed."""
        cfg, state, final = self.cfg, self.state, self.final
        self.eval_hooks.close()
        self.ckpt.close()
        self.source.close()
        if warnings := self.faults.finish():
            final["warnings"] = warnings
        final["wall_time_s"] = time.perf_counter() - self.t_start
        final["step"] = int(state.step)
        final["nonfinite_total"] = int(state.nonfinite_total)
        if self.is_main:
            with open(os.path.join(self.workdir, "final_metrics.json"), "w") as f:
                json.dump(final, f, indent=2, sort_keys=True)
        if (
            cfg.train.samples
            and self.is_main
            and (not finetune.uses_records(cfg) or cfg.train.sample_prompt)
        ):
            params = finetune.full_params(cfg, state.params, self.frozen)
            self.ahead.wait("sampling")
            texts = sample_texts(self.setup, params, cfg.train.samples, cfg.train.sample_tokens)
            for i, text in enumerate(texts):
                self.print_fn(f"--- sample {i} ---\n{text}")
        self.logger.close()
        return final | {"state": state}


__all__ = [
    "Setup",
    "Trainer",
    "TrainingInterrupted",
    "build",
    "build_layout",
    "dispatch_group",
    "dispatch_size",
    "eval_rows_per_process",
    "evaluate",
    "evaluate_rows",
    "resolve_data",
    "sample_texts",
    "step_functions",
    "to_global",
    "train",
]
