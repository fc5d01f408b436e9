"""Grain input pipeline over token shards: windows → per-process shard → shuffle → examples → batches.

Packing is *concatenate and split*: each split is one token stream (documents separated by EOS),
cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``. Nothing is dropped or padded;
segment ids and positions restart after every EOS, so packed documents never attend to each other
and the token after an EOS is never a target. Windows are shuffled globally with a per-epoch
permutation (Grain's lazy index shuffle), so the iterator state is one integer and resuming is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lmtrain.data.shards import TokenStream
from lmtrain.errors import ConfigError, DataError

EXAMPLE_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class WindowSource:
    """Random-access windows of ``seq_len + 1`` tokens over a ``TokenStream`` (a Grain source)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self.num_windows = (stream.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"split {stream.dir} has {stream.num_tokens} tokens, fewer than one window of "
                f"seq_len+1={seq_len + 1}; lower config.data.seq_len or add data"
            )

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        return self.stream.read(int(i) * self.seq_len, self.seq_len + 1)


def windows_to_examples(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Next-token examples for a (N, seq_len + 1) block of windows, vectorised over rows.

    Segment ids and positions come from EOS separators: the segment of token i is 1 + the number
    of EOS strictly before it (an EOS ends its own document); positions restart at each segment.
    """
    windows = np.atleast_2d(windows)
    n, length = windows.shape
    is_eos = windows[:, :-1] == eos_id
    seg = np.ones((n, length), np.int32)
    seg[:, 1:] += np.cumsum(is_eos, axis=1, dtype=np.int32)
    idx = np.broadcast_to(np.arange(length), (n, length))
    new_doc = np.ones((n, length), bool)
    new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = np.maximum.accumulate(np.where(new_doc, idx, 0), axis=1)
    return {
        "inputs": windows[:, :-1].astype(np.int32),
        "targets": windows[:, 1:].astype(np.int32),
        "loss_mask": (seg[:, 1:] == seg[:, :-1]).astype(np.int32),
        "segment_ids": seg[:, :-1],
        "positions": (idx - starts)[:, :-1].astype(np.int32),
    }


def train_dataset(
    split_dir: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """An infinite Grain ``MapDataset`` of per-process batches; ``iter()`` it for a stateful iterator."""
    stream = TokenStream(split_dir)
    eos = stream.eos_id
    ds = shuffled_batches(
        WindowSource(stream, seq_len),
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        too_few=lambda n: (
            f"split {split_dir} yields {n} windows per process, fewer than the per-process "
            f"batch of {batch_size}; lower config.train.global_batch_size or data.seq_len"
        ),
    )
    # Batch the raw windows first, then derive the example fields for the whole batch at once:
    # one vectorised call per batch keeps the host pipeline well under a millisecond per step.
    return ds.map(lambda w: windows_to_examples(w, eos))


def shuffled_batches(source, *, batch_size: int, seed: int, process_index: int,
                     process_count: int, too_few: Callable[[int], str]):  # fmt: skip
    """This process's share of ``source`` (a random-access source), shuffled, repeated forever
    and batched (a Grain ``MapDataset``); ``too_few(rows)``: the error when a batch cannot fill."""
    import grain

    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if len(ds) < batch_size:
        raise DataError(too_few(len(ds)))
    return ds.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)


def iterate(ds):
    """A checkpointable iterator over a ``MapDataset`` that reads in the calling thread.

    The loop's own ``Prefetcher`` thread already overlaps input with compute; Grain's default
    thread pool on top of it costs several times the CPU per batch, which a small host feels.
    """
    import grain

    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(
    split_dir: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
):
    """Every window of a split once, in order; the last batch is padded with masked rows."""
    stream = TokenStream(split_dir)
    src = WindowSource(stream, seq_len)
    indices = np.arange(len(src))[process_index::process_count]
    n_batches = -(-len(indices) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        idx = indices[b * batch_size : (b + 1) * batch_size]
        batch = windows_to_examples(np.stack([src[i] for i in idx]), stream.eos_id)
        if len(idx) < batch_size:  # padding rows: segment 0 and loss mask 0, so they never count
            pad = batch_size - len(idx)
            batch = {
                k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        yield batch


def check_curriculum(start_len: int, steps: int, seq_len: int) -> None:
    """Sequence-length warmup settings: off (0) or a power-of-two fraction of seq_len."""
    if start_len == 0:
        return
    ratio = seq_len // start_len if 0 < start_len <= seq_len else 0
    if ratio * start_len != seq_len or ratio & (ratio - 1):
        raise ConfigError(
            f"config.data.curriculum_start_len={start_len} must be seq_len={seq_len} divided by a "
            "power of two (e.g. seq_len/4), or 0 to turn the length warmup off"
        )
    if steps <= 0:
        raise ConfigError(
            "config.data.curriculum_steps must be positive when config.data.curriculum_start_len "
            "is set (the number of steps over which the length grows to seq_len)"
        )


def curriculum_seq_len(step: int, start_len: int, steps: int, seq_len: int) -> int:
    """Length at ``step``: start_len, 2·start_len, ... seq_len, equal steps per length.

    Lengths are bucketed (powers of two) so the train step compiles once per bucket, not per step.
    """
    if not start_len or step >= steps:
        return seq_len
    n = (seq_len // start_len).bit_length()  # number of buckets, the last being seq_len
    return start_len * 2 ** min(step * n // steps, n - 1)


def split_rows(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """(B, T) → (B·T/length, length): the same tokens as shorter rows.

    Segment ids and loss masks stay valid per token; positions keep their offsets, which RoPE
    (relative) ignores, so each piece is a correct shorter example of the same documents.
    """
    b, t = batch["inputs"].shape
    if length == t:
        return batch
    return {k: v.reshape(b * (t // length), length, *v.shape[2:]) for k, v in batch.items()}


def curriculum_batch(batch: dict[str, np.ndarray], step: int, data_cfg) -> dict[str, np.ndarray]:
    start = data_cfg.get("curriculum_start_len", 0)
    if not start:  # off; also leaves fine-tuning batches (chosen_*/rejected_* keys) untouched
        return batch
    t = batch["inputs"].shape[1]
    length = curriculum_seq_len(step, start, data_cfg.get("curriculum_steps", 0), t)
    return split_rows(batch, length)
