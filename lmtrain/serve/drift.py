"""The validation-split reference for the server's drift signal (see ``lmtrain.serve.metrics``).

Windows are spread evenly over the run's validation token stream (``<data.dir>/<eval_split>``)
and scored with the served model the same way prompts are (mean negative log-likelihood per
token), so the two histograms on ``/metrics`` measure the same thing.
"""

from __future__ import annotations

import os

import numpy as np

from lmtrain.data.shards import INDEX_FILE, TokenStream
from lmtrain.errors import DataError


def validation_windows(
    data_dir: str, split: str, *, count: int, length: int
) -> tuple[list[list[int]], str]:
    """Up to ``count`` windows of ``length`` ids from the split, and a label of where they came
    from; ``([], "none")`` when the run has no such split on disk."""
    split_dir = os.path.join(data_dir, split) if data_dir else ""
    if not split_dir or not os.path.exists(os.path.join(split_dir, INDEX_FILE)):
        return [], "none"
    try:
        stream = TokenStream(split_dir)
    except DataError:
        return [], "none"
    n = len(stream)
    if n < length or length < 2:
        return [], "none"
    starts = np.linspace(0, n - length, num=min(count, n - length + 1)).astype(np.int64)
    rows = [stream.read(int(s), length).astype(np.int64).tolist() for s in np.unique(starts)]
    return rows, split


def reference_log_perplexity(engine, config, *, count: int = 32, length: int = 64) -> tuple:
    """(values, source, window length) for ``ServeMetrics.set_reference``."""
    length = max(2, min(length, engine.cfg.max_seq_len))
    rows, source = validation_windows(
        str(config.data.dir or ""), str(config.data.eval_split), count=count, length=length
    )
    rows = [r for r in rows if max(r) < engine.cfg.vocab_size]
    if not rows:
        return [], "none", length
    return engine.prompt_nll(rows), source, length
