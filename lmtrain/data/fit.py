"""Over-long fine-tuning examples: one explicit policy, and every drop and cut counted by reason.

An example of ``n`` tokens fits a row of ``max_len`` next-token pairs when ``n <= max_len + 1``.
``config.data.truncation`` says what happens to one that does not. The names and the keep_end /
keep_start semantics are TRL's ``truncation_mode`` (DPOConfig: "Truncation mode to use when the
sequence exceeds max_length", default ``keep_end``):

* ``keep_end`` (default): keep the end of the sequence, i.e. drop the oldest *prompt* tokens, so
  the last assistant turn keeps its header, content, end marker and EOS. One deviation from TRL:
  when that turn does not fit the row on its own, TRL would keep only its tail (no prompt, no
  role header, a response cut at the start); such an example is dropped instead, as
  ``response_too_long``, because that row would teach the model text without its context.
* ``keep_start``: keep the first ``max_len + 1`` tokens; the response loses its tail and its EOS
  (``response_cut``). An example left with no trained token (the prompt fills the row) is dropped
  (``no_trained_tokens``): it would add nothing to the loss, and a preference pair with an empty
  side is not a pair.
* ``drop``: every over-long example is dropped (``too_long``).

``left_prompt`` and ``right`` (the earlier names) mean ``keep_end`` and ``keep_start``.

Preference pairs are fitted as one: both sides lose the same prompt tokens (identical context)
and the pair is dropped as a whole. RL prompts (``fit_prompt``) leave room for the completion and
are cut from the left only, like TRL's ``max_prompt_length``.

``FitStats`` counts examples seen, kept, cut and dropped per reason; the train loop prints its
one-line ``summary()``, logs ``metrics()`` and refuses a run whose dropped share exceeds
``config.data.max_lost_fraction`` (``check``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from lmtrain.errors import DataError

Truncation = Literal["keep_end", "keep_start", "drop"]
POLICIES = ("keep_end", "keep_start", "drop")
ALIASES = {"left_prompt": "keep_end", "right": "keep_start"}
LOST_KEY = "config.data.max_lost_fraction"

PROMPT_CUT = "prompt_cut"  # oldest prompt tokens dropped; the response is whole
RESPONSE_CUT = "response_cut"  # the response lost its tail (end marker / EOS)
TOO_LONG = "too_long"  # dropped by policy 'drop'
RESPONSE_TOO_LONG = "response_too_long"  # keep_end: the last turn alone exceeds the row
NO_TRAINED_TOKENS = "no_trained_tokens"  # keep_start: no trained token left in the row
CUTS = (PROMPT_CUT, RESPONSE_CUT)
DROPS = (TOO_LONG, RESPONSE_TOO_LONG, NO_TRAINED_TOKENS)


def policy(truncation: str) -> str:
    """The canonical policy name (``keep_end``, ``keep_start``, ``drop``) for a config value."""
    name = ALIASES.get(truncation, truncation)
    if name not in POLICIES:
        raise DataError(
            f"truncation={truncation!r}: use keep_end (cut the prompt from the left), keep_start "
            "(cut the end) or drop"
        )
    return name


class Cut(NamedTuple):
    """Keep ``ids[start:end]`` (``start is None``: drop the example); ``reason`` None = unchanged."""

    start: int | None
    end: int | None
    reason: str | None


def _trained(mask: np.ndarray, start: int, end: int) -> bool:
    # loss_mask[i] marks ids[i] as a target; a row's targets are ids[start + 1 : end].
    return bool(np.any(mask[start + 1 : end]))


def plan(mask: np.ndarray, response_start: int, limit: int, truncation: str) -> Cut:
    """Where to cut one sequence (``loss_mask`` aligned to its ids) to fit ``limit`` ids."""
    name, n = policy(truncation), len(mask)
    if n <= limit:
        return Cut(0, n, None)
    if name == "drop":
        return Cut(None, None, TOO_LONG)
    if name == "keep_end":
        excess = n - limit
        if excess > response_start:
            return Cut(None, None, RESPONSE_TOO_LONG)
        return Cut(excess, n, PROMPT_CUT)
    if not _trained(mask, 0, limit):
        return Cut(None, None, NO_TRAINED_TOKENS)
    return Cut(0, limit, RESPONSE_CUT)


def plan_pair(
    chosen_mask: np.ndarray,
    rejected_mask: np.ndarray,
    response_start: int,
    limit: int,
    truncation: str,
) -> tuple[Cut, Cut]:
    """Cuts for both sides of a preference pair (same prompt, so the same ``response_start``).

    keep_end drops the same prompt tokens from both sides (the longer side decides how many);
    the pair is dropped as a whole when either side would be.
    """
    name = policy(truncation)
    longest = max(len(chosen_mask), len(rejected_mask))
    if longest <= limit:
        return Cut(0, len(chosen_mask), None), Cut(0, len(rejected_mask), None)
    if name == "keep_end":
        excess = longest - limit
        if excess > response_start:
            drop = Cut(None, None, RESPONSE_TOO_LONG)
            return drop, drop
        return (
            Cut(excess, len(chosen_mask), PROMPT_CUT),
            Cut(excess, len(rejected_mask), PROMPT_CUT),
        )
    cuts = tuple(plan(m, response_start, limit, name) for m in (chosen_mask, rejected_mask))
    dropped = next((c for c in cuts if c.start is None), None)
    if dropped is not None:
        return dropped, dropped
    reason = RESPONSE_CUT if any(c.reason for c in cuts) else None
    return Cut(0, cuts[0].end, reason), Cut(0, cuts[1].end, reason)


def fit_prompt(
    ids: Sequence[int], max_prompt_len: int, truncation: str = "keep_end"
) -> tuple[list[int] | None, str | None]:
    """An RL prompt (ending with the open assistant header) fitted to ``max_prompt_len`` tokens.

    Returns ``(ids or None when dropped, reason or None when unchanged)``. ``keep_end`` drops the
    oldest tokens (TRL: ``prompt_ids[-max_prompt_length:]``), so the header the completion
    continues stays; ``keep_start`` would cut that header away and is refused.
    """
    if max_prompt_len < 1:
        raise DataError(
            f"max_prompt_len={max_prompt_len}: leave room for the prompt (seq_len minus the "
            "completion's max tokens must be at least 1)"
        )
    name, ids = policy(truncation), list(ids)
    if len(ids) <= max_prompt_len:
        return ids, None
    if name == "drop":
        return None, TOO_LONG
    if name == "keep_start":
        raise DataError(
            "RL prompts: truncation='keep_start' would cut the assistant header the completion "
            "starts from; use keep_end or drop"
        )
    return ids[len(ids) - max_prompt_len :], PROMPT_CUT


@dataclass
class FitStats:
    """Counts of one data file's fitting: examples seen, cut and dropped by reason."""

    what: str  # "SFT examples", "preference pairs", "RL prompts"
    max_len: int
    truncation: str
    source: str = ""
    limit_key: str = "config.data.seq_len"  # the key that sets max_len (RL: the prompt budget)
    seen: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str | None) -> None:
        self.seen += 1
        if reason is not None:
            self.reasons[reason] += 1

    @property
    def dropped(self) -> int:
        return sum(self.reasons[r] for r in DROPS)

    @property
    def cut(self) -> int:
        return sum(self.reasons[r] for r in CUTS)

    @property
    def kept(self) -> int:
        return self.seen - self.dropped

    @property
    def lost_fraction(self) -> float:
        return self.dropped / self.seen if self.seen else 0.0

    @property
    def _limit(self) -> str:
        return self.limit_key.rsplit(".", 1)[-1]

    def summary(self) -> str:
        """One console line: what was seen, cut and dropped, by reason."""

        def by_reason(names: Sequence[str]) -> str:
            parts = [f"{r} {self.reasons[r]}" for r in names if self.reasons[r]]
            return f" ({', '.join(parts)})" if parts else ""

        where = f"{self.source}: " if self.source else ""
        return (
            f"{where}{self.seen} {self.what} at {self._limit} {self.max_len}, truncation "
            f"{self.truncation}: {self.seen - self.dropped - self.cut} whole, {self.cut} cut"
            f"{by_reason(CUTS)}, {self.dropped} dropped{by_reason(DROPS)} "
            f"= {100 * self.lost_fraction:.1f}% lost"
        )

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Every count under ``prefix`` (zeros included, so a missing key never means zero)."""
        out = {f"{prefix}examples": self.seen, f"{prefix}kept": self.kept}
        out.update({f"{prefix}{r}": self.reasons[r] for r in (*CUTS, *DROPS)})
        out[f"{prefix}lost_fraction"] = self.lost_fraction
        return out

    def check(self, max_lost_fraction: float) -> None:
        """Refuses (DataError) when the dropped share exceeds ``max_lost_fraction``."""
        if self.seen and self.lost_fraction > max_lost_fraction:
            where = f"{self.source}: " if self.source else ""
            raise DataError(
                f"{where}{self.dropped} of {self.seen} {self.what} "
                f"({100 * self.lost_fraction:.1f}%) do not fit {self._limit} {self.max_len} "
                f"with truncation={self.truncation!r}, more than {LOST_KEY}={max_lost_fraction}; "
                f"raise {self.limit_key}, choose another config.data.truncation, or raise "
                f"{LOST_KEY}"
            )


def fit_prompts(
    prompts: Iterable[Sequence[int]],
    max_prompt_len: int,
    truncation: str = "keep_end",
    stats: FitStats | None = None,
) -> Iterator[list[int]]:
    """Fits each prompt (``fit_prompt``), skipping dropped ones; counts into ``stats``."""
    for ids in prompts:
        fitted, reason = fit_prompt(ids, max_prompt_len, truncation)
        if stats is not None:
            stats.add(reason)
        if fitted is not None:
            yield fitted
