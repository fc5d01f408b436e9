"""SFT and preference examples: conversations → fixed-length next-token arrays, plus a packer.

Every example is a dict of ``int32`` arrays of length ``max_len``:

* ``inputs``/``targets``: ``ids[:-1]``/``ids[1:]`` of the templated conversation, padded with
  ``pad_id`` (never EOS, so a padded row cannot teach "stop" by accident);
* ``loss_mask``: aligned to ``targets``; 1 on assistant content, its end marker and the final EOS;
* ``segment_ids``: 1, 2, 3... per example in a row (1 when unpacked), 0 on padding;
* ``positions``: 0.. within each segment, 0 on padding.

A conversation of n tokens needs ``n - 1 <= max_len``. A longer one is cut or dropped by the
``truncation`` policy of lmtrain/data/fit.py (``keep_end``: drop the oldest prompt tokens so the
whole last assistant turn and its EOS stay; ``keep_start``: keep the first ``max_len + 1`` tokens;
``drop``); ``fit_example`` says which, so callers count every cut and drop.

The builders are pure functions of their arguments; ``SFTExampleFn`` and ``PreferenceExampleFn``
bind the arguments into picklable callables for Grain's ``MapDataset.map``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from lmtrain.data import fit
from lmtrain.data.chat_template import ChatTemplate
from lmtrain.data.fit import FitStats
from lmtrain.data.formats import ConversationLike, PreferencePair, Turn, as_conversation
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import DataError

Truncation = fit.Truncation
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclass(frozen=True)
class TokenizedExample:
    """One templated conversation before padding: ``ids`` and ``loss_mask`` aligned (int32)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    response_start: int  # tokens before this index are prompt; see ChatTemplate.encode_chat

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_sft(
    conv: ConversationLike, tokenizer: Tokenizer, template: ChatTemplate
) -> TokenizedExample:
    ids, mask, start = template.encode_chat(conv, tokenizer)
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(mask, np.int32), start)


def _slice(ex: TokenizedExample, start: int, end: int) -> TokenizedExample:
    return TokenizedExample(
        ex.ids[start:end], ex.loss_mask[start:end], max(ex.response_start - start, 0)
    )


def fit_example(
    ex: TokenizedExample, max_len: int, truncation: str = "keep_end"
) -> tuple[TokenizedExample | None, str | None]:
    """Fits ``ex`` into ``max_len`` next-token pairs (``max_len + 1`` ids).

    Returns ``(example, reason)``: the example unchanged with reason None, cut with a reason from
    ``fit.CUTS``, or ``None`` with a reason from ``fit.DROPS`` when the policy drops it.
    """
    if max_len < 1:
        raise DataError(f"max_len={max_len}: must be at least 1")
    cut = fit.plan(ex.loss_mask, ex.response_start, max_len + 1, truncation)
    if cut.start is None:
        return None, cut.reason
    if cut.reason is None:
        return ex, None
    return _slice(ex, cut.start, cut.end), cut.reason


def _refuse(conv: ConversationLike, reason: str, max_len: int, truncation: str) -> DataError:
    where = as_conversation(conv).source or "conversation"
    other = "" if fit.policy(truncation) == "keep_end" else " or use truncation='keep_end'"
    return DataError(
        f"{where}: dropped ({reason}): does not fit max_len={max_len} with "
        f"truncation={truncation!r}; raise max_len{other}"
    )


def _pairs(ex: TokenizedExample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return ex.ids[:-1], ex.ids[1:], ex.loss_mask[1:]


def _row(pieces: list[TokenizedExample], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(max_len, np.int32) for k in FIELDS}
    row["inputs"][:] = pad_id
    row["targets"][:] = pad_id
    at = 0
    for seg, ex in enumerate(pieces, 1):
        inputs, targets, mask = _pairs(ex)
        n = len(inputs)
        row["inputs"][at : at + n] = inputs
        row["targets"][at : at + n] = targets
        row["loss_mask"][at : at + n] = mask
        row["segment_ids"][at : at + n] = seg
        row["positions"][at : at + n] = np.arange(n, dtype=np.int32)
        at += n
    return row


def pad_example(ex: TokenizedExample, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One (already fitting) example → a padded row with segment id 1."""
    if len(ex) - 1 > max_len:
        raise DataError(f"example of {len(ex)} tokens does not fit max_len={max_len}; truncate it")
    return _row([ex], max_len, pad_id)


def build_sft_example(
    conv: ConversationLike,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_len: int,
    truncation: Truncation = "keep_end",
) -> dict[str, np.ndarray]:
    """Conversation → one padded row (keys ``FIELDS``, int32, shape ``[max_len]``).

    Raises DataError when the policy drops it (use ``fit_example`` to count drops instead).
    """
    ex, reason = fit_example(tokenize_sft(conv, tokenizer, template), max_len, truncation)
    if ex is None:
        raise _refuse(conv, reason, max_len, truncation)
    return pad_example(ex, max_len, tokenizer.pad_id)


@dataclass
class PackStats:
    max_len: int
    examples: int = 0  # packed (dropped ones are counted by FitStats only)
    rows: int = 0
    truncated: int = 0  # examples cut to fit one row (counted, never split across rows)
    tokens: int = 0  # real (non-padding) positions

    @property
    def fill(self) -> float:
        """Fraction of row positions holding real tokens (1.0 = no padding)."""
        return self.tokens / max(1, self.rows * self.max_len)


def iter_packed(
    examples: Iterable[TokenizedExample],
    max_len: int,
    *,
    pad_id: int,
    truncation: Truncation = "keep_end",
    max_open_rows: int = 256,
    stats: PackStats | None = None,
    fit_stats: FitStats | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Greedy first-fit packing, streaming: each example goes into the first open row with room.

    Over-long examples are cut or dropped by ``truncation`` first (counted in ``fit_stats``).

    At most ``max_open_rows`` rows are open; opening one more emits the fullest. Full rows are
    emitted at once and the rest at the end, in the order they were opened.
    """
    stats = stats if stats is not None else PackStats(max_len)
    open_rows: list[list[TokenizedExample]] = []
    room = np.zeros(0, np.int64)

    def emit(i: int) -> dict[str, np.ndarray]:
        nonlocal room
        pieces = open_rows.pop(i)
        room = np.delete(room, i)
        stats.rows += 1
        return _row(pieces, max_len, pad_id)

    for ex in examples:
        ex, reason = fit_example(ex, max_len, truncation)
        if fit_stats is not None:
            fit_stats.add(reason)
        if ex is None:
            continue
        n = len(ex) - 1
        stats.examples += 1
        stats.truncated += int(reason is not None)
        stats.tokens += n
        fits = np.flatnonzero(room >= n)
        if fits.size:
            i = int(fits[0])
            open_rows[i].append(ex)
            room[i] -= n
        else:
            if len(open_rows) >= max_open_rows:
                yield emit(int(np.argmin(room)))
            open_rows.append([ex])
            room = np.append(room, max_len - n)
            i = len(open_rows) - 1
        if room[i] == 0:
            yield emit(i)
    while open_rows:
        yield emit(0)


def pack_examples(
    examples: Iterable[TokenizedExample],
    max_len: int,
    *,
    pad_id: int,
    truncation: Truncation = "keep_end",
    max_open_rows: int = 256,
    fit_stats: FitStats | None = None,
) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    """Packs tokenized examples into rows of ``max_len``; returns the rows and their counts."""
    stats = PackStats(max_len)
    rows = list(
        iter_packed(
            examples,
            max_len,
            pad_id=pad_id,
            truncation=truncation,
            max_open_rows=max_open_rows,
            stats=stats,
            fit_stats=fit_stats,
        )
    )
    return rows, stats


def preference_example(
    prompt_conv: ConversationLike,
    chosen: str,
    rejected: str,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_len: int,
    truncation: Truncation = "keep_end",
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """``(rows or None when dropped, reason)`` for one pair; see ``build_preference_example``."""
    if max_len < 1:
        raise DataError(f"max_len={max_len}: must be at least 1")
    last_only = replace(template, train_on_all_assistant_turns=False)
    turns = list(as_conversation(prompt_conv))
    sides = {
        name: tokenize_sft([*turns, Turn("assistant", text)], tokenizer, last_only)
        for name, text in (("chosen", chosen), ("rejected", rejected))
    }
    start = sides["chosen"].response_start  # equal on both sides: same prompt, same encoding
    cuts = fit.plan_pair(
        sides["chosen"].loss_mask, sides["rejected"].loss_mask, start, max_len + 1, truncation
    )
    if cuts[0].start is None:
        return None, cuts[0].reason
    out = {}
    for (name, ex), cut in zip(sides.items(), cuts):
        ex = _slice(ex, cut.start, cut.end)
        out.update(
            {f"{name}_{k}": v for k, v in pad_example(ex, max_len, tokenizer.pad_id).items()}
        )
    return out, cuts[0].reason


def build_preference_example(
    prompt_conv: ConversationLike,
    chosen: str,
    rejected: str,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_len: int,
    truncation: Truncation = "keep_end",
) -> dict[str, np.ndarray]:
    """Prompt + each response → ``chosen_<field>`` and ``rejected_<field>`` rows (int32).

    Only the final response, its end marker and EOS are unmasked (earlier assistant turns in the
    prompt are context). Both sides drop the same prompt tokens, so they see identical context.
    Raises DataError when the policy drops the pair (``preference_example`` returns None).
    """
    out, reason = preference_example(
        prompt_conv, chosen, rejected, tokenizer, template, max_len, truncation
    )
    if out is None:
        raise _refuse(prompt_conv, reason, max_len, truncation)
    return out


@dataclass(frozen=True)
class SFTExampleFn:
    """Picklable ``Conversation -> example`` for ``grain.MapDataset.map``."""

    tokenizer: Tokenizer
    template: ChatTemplate
    max_len: int
    truncation: Truncation = "keep_end"

    def __call__(self, conv: ConversationLike) -> dict[str, np.ndarray]:
        return build_sft_example(conv, self.tokenizer, self.template, self.max_len, self.truncation)


@dataclass(frozen=True)
class PreferenceExampleFn:
    """Picklable ``PreferencePair -> example`` for ``grain.MapDataset.map``."""

    tokenizer: Tokenizer
    template: ChatTemplate
    max_len: int
    truncation: Truncation = "keep_end"

    def __call__(self, pair: PreferencePair) -> dict[str, np.ndarray]:
        return build_preference_example(
            pair.prompt,
            pair.chosen,
            pair.rejected,
            self.tokenizer,
            self.template,
            self.max_len,
            self.truncation,
        )
