"""Fine-tuning batches for the train loop: JSONL records → fixed-length rows → Grain batches.

SFT records (objectives ``sft``, ``distill``) become LM-layout rows (``inputs, targets,
loss_mask, segment_ids, positions``), packed several per row when ``config.data.packing``;
preference records (``dpo``, ``reward``) become ``chosen_*`` / ``rejected_*`` rows, one pair per
row. Rows are built once in memory (fine-tuning sets are small next to pre-training streams) and
served by a Grain ``MapDataset`` with a global shuffle, so the iterator state is one integer and a
resumed run sees exactly the batches it would have seen.

Over-long records are cut or dropped by ``config.data.truncation`` and counted (``FitStats``,
lmtrain/data/fit.py); a file whose dropped share exceeds ``config.data.max_lost_fraction`` is
refused before any row is served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from lmtrain.data.chat_template import ChatTemplate
from lmtrain.data.fit import FitStats, policy
from lmtrain.data.formats import ReadStats, read_preferences, read_sft
from lmtrain.data.pipeline import shuffled_batches
from lmtrain.data.sft import (
    PackStats,
    fit_example,
    pack_examples,
    pad_example,
    preference_example,
    tokenize_sft,
)
from lmtrain.data.shards import write_split
from lmtrain.data.tokenizer import CHAT_SPECIALS, Tokenizer
from lmtrain.errors import DataError

PREFERENCE_OBJECTIVES = ("dpo", "reward")


def chat_template_for(tokenizer: Tokenizer, markers: str = "auto") -> ChatTemplate:
    """The default template; markers as special tokens when the tokenizer has them (``auto``)."""
    if markers == "auto":
        try:
            for piece in CHAT_SPECIALS:
                tokenizer.token_id(piece)
            markers = "special"
        except DataError:
            markers = "text"
    return ChatTemplate(markers_are_special=markers == "special")


def stack_rows(rows: list[Mapping[str, np.ndarray]], where: str) -> dict[str, np.ndarray]:
    if not rows:
        raise DataError(f"{where}: no usable records")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _fit_stats(what: str, path: str, seq_len: int, truncation: str, given: FitStats | None):
    return given if given is not None else FitStats(what, seq_len, policy(truncation), path)


def sft_rows(
    path: str,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    seq_len: int,
    *,
    layout: str = "auto",
    packing: bool = True,
    truncation: str = "keep_end",
    fit_stats: FitStats | None = None,
    max_lost_fraction: float = 1.0,
) -> tuple[dict[str, np.ndarray], PackStats]:
    """All SFT records of ``path`` as stacked (N, seq_len) int32 arrays, plus packing counts.

    Over-long records are cut or dropped (counted in ``fit_stats``); more than
    ``max_lost_fraction`` dropped raises DataError.
    """
    stats = ReadStats()
    fit_stats = _fit_stats("SFT examples", path, seq_len, truncation, fit_stats)
    examples = [
        tokenize_sft(c, tokenizer, template) for c in read_sft(path, layout=layout, stats=stats)
    ]
    if packing:
        rows, pack = pack_examples(
            examples, seq_len, pad_id=tokenizer.pad_id, truncation=truncation, fit_stats=fit_stats
        )
    else:
        pack, rows = PackStats(seq_len), []
        for ex in examples:
            ex, reason = fit_example(ex, seq_len, truncation)
            fit_stats.add(reason)
            if ex is None:
                continue
            rows.append(pad_example(ex, seq_len, tokenizer.pad_id))
            pack.examples += 1
            pack.rows += 1
            pack.truncated += int(reason is not None)
            pack.tokens += len(ex) - 1
    fit_stats.check(max_lost_fraction)
    return stack_rows(rows, path), pack


def preference_rows(
    path: str,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    seq_len: int,
    *,
    truncation: str = "keep_end",
    fit_stats: FitStats | None = None,
    max_lost_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """All preference pairs of ``path`` as stacked ``chosen_*`` / ``rejected_*`` arrays.

    Pairs are cut or dropped as a whole (counted in ``fit_stats``); more than
    ``max_lost_fraction`` dropped raises DataError.
    """
    fit_stats = _fit_stats("preference pairs", path, seq_len, truncation, fit_stats)
    rows = []
    for p in read_preferences(path):
        row, reason = preference_example(
            p.prompt, p.chosen, p.rejected, tokenizer, template, seq_len, truncation
        )
        fit_stats.add(reason)
        if row is not None:
            rows.append(row)
    fit_stats.check(max_lost_fraction)
    return stack_rows(rows, path)


def rows_and_fit(config, tokenizer: Tokenizer, path: str) -> tuple[dict[str, np.ndarray], FitStats]:
    """Rows for ``config.objective`` from one JSONL file, and what fitting them cut and dropped.

    Refuses (DataError) a file whose dropped share exceeds ``config.data.max_lost_fraction``.
    """
    d = config.data
    template = chat_template_for(tokenizer, d.chat_markers)
    preference = config.objective in PREFERENCE_OBJECTIVES
    what = "preference pairs" if preference else "SFT examples"
    fit_stats = FitStats(what, d.seq_len, policy(d.truncation), path)
    kw = dict(truncation=d.truncation, fit_stats=fit_stats, max_lost_fraction=d.max_lost_fraction)
    if preference:
        return preference_rows(path, tokenizer, template, d.seq_len, **kw), fit_stats
    rows, _ = sft_rows(
        path, tokenizer, template, d.seq_len, layout=d.format, packing=d.packing, **kw
    )
    return rows, fit_stats


def rows_for_objective(config, tokenizer: Tokenizer, path: str) -> dict[str, np.ndarray]:
    """Rows for ``config.objective`` from one JSONL file, using the ``config.data`` settings."""
    return rows_and_fit(config, tokenizer, path)[0]


def num_rows(rows: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(rows.values())))


class RowSource:
    """Random access to row ``i`` of stacked arrays (a Grain data source)."""

    def __init__(self, rows: Mapping[str, np.ndarray]):
        self.rows = dict(rows)
        self.n = num_rows(rows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[int(i)] for k, v in self.rows.items()}


def train_dataset(
    rows: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Infinite shuffled per-process batches (a Grain ``MapDataset``; ``iter()`` it)."""
    return shuffled_batches(
        RowSource(rows),
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        too_few=lambda n: (
            f"fine-tuning data has {n} rows per process, fewer than the per-process batch of "
            f"{batch_size}; lower config.train.global_batch_size or add records"
        ),
    )


def eval_batches(
    rows: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order; the last batch is filled with all-zero rows (masked out)."""
    idx = np.arange(num_rows(rows))[process_index::process_count]
    n_batches = -(-len(idx) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        take = idx[b * batch_size : (b + 1) * batch_size]
        batch = {k: v[take] for k, v in rows.items()}
        short = batch_size - len(take)
        if short:
            batch = {
                k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        yield batch


def write_token_dataset(
    out_dir: str, tokenizer: Tokenizer, splits: Mapping[str, Iterable[str]]
) -> dict:
    """Token shards for ``config.data.dir`` from in-memory documents and a given tokenizer.

    Lets a recipe pre-train on the exact vocabulary it fine-tunes with (e.g. a char tokenizer
    with the chat specials); each document ends with EOS, like ``lmtrain data prepare``.
    """
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer"))
    return {
        name: write_split(
            os.path.join(out_dir, name),
            (tokenizer.encode(t) for t in docs),
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
        )
        for name, docs in splits.items()
    }


def write_jsonl(path: str, records: Iterable[Mapping]) -> int:
    """Writes one JSON object per line; returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
