"""Where a run's train batches come from: token shards, fine-tuning records, or RL rollouts."""

from __future__ import annotations

import dataclasses

import jax

from lmtrain.data import finetune_data, pipeline
from lmtrain.train import finetune, rollout
from lmtrain.train.prefetch import Prefetcher
from lmtrain.train.setup import Setup, token_dataset


@dataclasses.dataclass
class Source:
    """The train batches: ``batches`` (``next``, ``get_state``, ``close``) over ``ds``.

    ``rl``: the rollout source of online RL (then also ``batches``); ``num_records``: the rows of
    a fine-tuning records run (names the batches if it diverges); ``fit_metrics``: what fitting
    seq_len cut and dropped, logged at the start.
    """

    ds: object
    batches: object
    prefetch: int
    rl: object = None
    num_records: int = 0
    fit_metrics: dict = dataclasses.field(default_factory=dict)

    def reopen(self, iter_state: dict) -> None:
        """Continue the stream from ``iter_state`` (a loss-spike rollback skips data)."""
        self.batches.close()
        self.batches = _prefetched(self.ds, iter_state, self.prefetch)

    def close(self) -> None:
        self.batches.close()


def _prefetched(ds, iter_state: dict | None, depth: int) -> Prefetcher:
    it = pipeline.iterate(ds)
    if iter_state:
        it.set_state(iter_state)
    return Prefetcher(it, depth)


def _records(setup: Setup, initial, print_fn) -> tuple:
    """(dataset, num_records, fit_metrics) of ``data.train_file``; precomputes DPO references."""
    cfg = setup.config
    rows, fit = finetune_data.rows_and_fit(cfg, setup.tokenizer, cfg.data.train_file)
    fit_metrics = fit.metrics("data/train/")
    for f in (fit, setup.eval_fit):
        if f is not None:
            print_fn(f.summary())
    if setup.eval_fit is not None:
        fit_metrics.update(setup.eval_fit.metrics("data/eval/"))
    if cfg.objective == "dpo" and cfg.dpo.reference == "precomputed":
        rows = finetune.add_reference_logps(setup, rows, initial, cfg.train.global_batch_size)
        if setup.eval_rows is not None:
            setup.eval_rows = finetune.add_reference_logps(
                setup, setup.eval_rows, initial, cfg.train.global_batch_size
            )
    ds = finetune_data.train_dataset(
        rows,
        batch_size=cfg.train.global_batch_size // jax.process_count(),
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return ds, finetune_data.num_rows(rows), fit_metrics


def open_source(
    setup: Setup, frozen, iter_state: dict | None, initial, workdir: str, print_fn, ds=None
) -> Source:
    """The run's train batches from ``iter_state`` (None: the start); ``ds``: token windows
    already built (compiling ahead needed them first)."""
    cfg = setup.config
    if rollout.is_rl(cfg):
        rl = rollout.make_source(setup, frozen, iter_state, workdir, print_fn)
        # prompts cut/dropped by config.data.truncation, logged at the start like records runs'
        return Source(None, rl, cfg.data.prefetch, rl=rl, fit_metrics=rl.fit_metrics)
    if finetune.uses_records(cfg):
        ds, num_records, fit_metrics = _records(setup, initial, print_fn)
        batches = _prefetched(ds, iter_state, cfg.data.prefetch)
        return Source(ds, batches, cfg.data.prefetch, None, num_records, fit_metrics)
    if ds is None:
        ds = token_dataset(cfg, setup)
    return Source(ds, _prefetched(ds, iter_state, cfg.data.prefetch), cfg.data.prefetch)
