"""Checks of the ``config.data`` section, by the data layer that reads it."""

from __future__ import annotations

from lmtrain.data.pipeline import check_curriculum
from lmtrain.errors import require

FORMATS = ("auto", "prompt_response", "chat", "alpaca", "seed_tasks")
# keep_end | keep_start | drop, and the earlier names of the first two (fit.ALIASES)
TRUNCATIONS = ("keep_end", "keep_start", "drop", "left_prompt", "right")


def check_data_section(d, max_seq_len: int) -> None:
    """``d``: ``config.data``; ``max_seq_len``: the model's (no window may be longer)."""
    require(d.seq_len > 0, "config.data.seq_len must be positive")
    require(
        d.seq_len <= max_seq_len,
        f"config.data.seq_len={d.seq_len} exceeds config.model.max_seq_len={max_seq_len}",
    )
    check_curriculum(d.curriculum_start_len, d.curriculum_steps, d.seq_len)
    require(
        bool(d.dir) != bool(d.path) or (d.train_file and not d.dir and not d.path),
        "set exactly one of config.data.dir (prepared shards) or config.data.path (one text file), or config.data.train_file (fine-tuning records)",
    )
    require(
        d.format in FORMATS,
        f"config.data.format={d.format!r}: auto, prompt_response, chat, alpaca or seed_tasks",
    )
    require(
        d.truncation in TRUNCATIONS,
        f"config.data.truncation={d.truncation!r}: keep_end, keep_start or drop",
    )
    require(
        0.0 <= d.max_lost_fraction <= 1.0,
        f"config.data.max_lost_fraction={d.max_lost_fraction} must be in [0, 1]",
    )
    require(
        d.chat_markers in ("auto", "special", "text"),
        f"config.data.chat_markers={d.chat_markers!r}: auto, special or text",
    )
    require(
        0.0 < d.val_fraction < 1.0, f"config.data.val_fraction={d.val_fraction} must be in (0, 1)"
    )
