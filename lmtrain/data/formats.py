"""Fine-tuning records: JSONL (plain or ``.gz``) → SFT ``Conversation``s and ``PreferencePair``s.

Bad lines fail as ``file:line: what is wrong``; ``on_error='skip'`` drops and counts them instead
(``ReadStats``), so a run can log what it lost. SFT layouts: prompt/response, chat messages, Alpaca
instruction/input/output, Alpaca seed tasks (one record per instance). Preference layouts:
prompt/chosen/rejected and hh-rlhf full dialogues (``split_hh_pair``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from lmtrain.data.fetch import missing_hint
from lmtrain.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SFT_LAYOUTS = ("auto", "prompt_response", "chat", "alpaca", "seed_tasks")
OnError = Literal["stop", "skip"]
MAX_KEPT_ERRORS = 20
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
R = TypeVar("R")


class Turn(NamedTuple):
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """Ordered ``(role, content)`` turns; ``source`` (``file:line``) lets later stages name it."""

    turns: tuple[Turn, ...]
    source: str = ""

    def __post_init__(self) -> None:
        turns = tuple(Turn(*t) for t in self.turns)
        for i, (role, content) in enumerate(turns):
            if role not in ROLES or not isinstance(content, str):
                raise DataError(
                    f"{self.source or 'conversation'}: turn {i} ({role!r}, {type(content).__name__})"
                    f" needs a role in {ROLES} and string content"
                )
        object.__setattr__(self, "turns", turns)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self.turns)


ConversationLike = Conversation | Sequence[tuple[str, str]]


def as_conversation(conv: ConversationLike) -> Conversation:
    return conv if isinstance(conv, Conversation) else Conversation(tuple(conv))


@dataclass(frozen=True)
class PreferencePair:
    """A prompt dialogue plus two candidate final assistant responses (chosen is preferred)."""

    prompt: Conversation
    chosen: str
    rejected: str
    source: str = ""


@dataclass
class ReadStats:
    """Filled while a reader runs: non-blank lines seen, records yielded, lines skipped."""

    lines: int = 0
    records: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_KEPT_ERRORS messages


def _field(obj: dict, key: str, kind: type, where: str, layout: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} ({layout} record has keys {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, kind):
        got = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field {key!r} must be a {kind.__name__}, got {got}")
    return value


def _object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _messages(msgs: Any, where: str, key: str = "messages") -> list[Turn]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{role, content}}")
    turns = []
    for i, m in enumerate(msgs):
        at = f"{where}: {key}[{i}]"
        m = _object(m, at)
        role = _field(m, "role", str, at, "message")
        if role not in ROLES:
            raise DataError(f"{at}.role {role!r} is not one of {', '.join(ROLES)}")
        turns.append(Turn(role, _field(m, "content", str, at, "message")))
    return turns


def _sft(turns: list[Turn], where: str) -> Conversation:
    assistant = [t.content for t in turns if t.role == "assistant"]
    if not assistant:
        raise DataError(f"{where}: conversation has no assistant turn, so nothing to train on")
    if any(not c.strip() for c in assistant):
        raise DataError(f"{where}: empty assistant response")
    return Conversation(tuple(turns), where)


_LAYOUT_BY_KEY = dict(
    messages="chat", instances="seed_tasks", instruction="alpaca", prompt="prompt_response"
)


def _alpaca_user(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def parse_sft_record(obj: Any, where: str = "record", layout: str = "auto") -> list[Conversation]:
    """One JSON object → conversations (several only for seed tasks: one per instance)."""
    obj = _object(obj, where)
    if layout not in SFT_LAYOUTS:
        raise DataError(f"SFT layout {layout!r}: use one of {', '.join(SFT_LAYOUTS)}")
    if layout == "auto":
        layout = next((v for k, v in _LAYOUT_BY_KEY.items() if k in obj), "unknown")
    if layout == "unknown":
        raise DataError(
            f"{where}: unknown SFT record with keys {sorted(obj)}; expected prompt/response, "
            "messages, instruction/input/output or instruction/instances"
        )
    if layout == "chat":
        return [_sft(_messages(obj.get("messages"), where), where)]

    def text(o: dict, key: str, at: str = where) -> str:
        return _field(o, key, str, at, layout)

    system = [Turn("system", text(obj, "system"))] if "system" in obj else []
    if layout == "prompt_response":
        qas = [(text(obj, "prompt"), text(obj, "response"), where)]
    elif layout == "alpaca":
        inp = text(obj, "input") if "input" in obj else ""
        qas = [(_alpaca_user(text(obj, "instruction"), inp), text(obj, "output"), where)]
    else:
        instruction, qas = text(obj, "instruction"), []
        for k, inst in enumerate(_field(obj, "instances", list, where, layout)):
            at = f"{where}: instances[{k}]"
            inst = _object(inst, at)
            user = _alpaca_user(instruction, text(inst, "input", at))
            qas.append((user, text(inst, "output", at), f"{where}#{k}"))
        if not qas:
            raise DataError(f"{where}: field 'instances' is empty")
    return [_sft([*system, Turn("user", q), Turn("assistant", a)], w) for q, a, w in qas]


def parse_hh_dialogue(text: str, where: str = "record") -> list[Turn]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` → turns (contents stripped of outer whitespace)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    turns = [
        Turn("user" if r == "Human" else "assistant", c.strip())
        for r, c in zip(parts[1::2], parts[2::2])
    ]
    if not turns:
        raise DataError(f"{where}: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    return turns


def split_hh_pair(chosen: str, rejected: str, where: str = "record") -> PreferencePair:
    """Splits two full hh-rlhf dialogues into the shared prompt and two final responses.

    The split point is the last ``\\n\\nAssistant:`` marker inside the longest common prefix of
    the two strings. Normally that is the last Assistant turn of both; when the dialogues diverge
    earlier (a few hh-rlhf rows do), the prompt is the shared part only and each response is the
    whole remainder of its dialogue, later ``\\n\\nHuman:`` turns included as plain text.
    """
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        raise DataError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    prompt = parse_hh_dialogue(chosen[:cut], where)
    start = cut + len(HH_ASSISTANT)
    return PreferencePair(
        Conversation(tuple(prompt), where), chosen[start:].strip(), rejected[start:].strip(), where
    )


def _prompt_turns(prompt: Any, where: str) -> list[Turn]:
    if isinstance(prompt, list):
        return _messages(prompt, where, "prompt")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages")
    if _HH_TURN.match(prompt):  # hh-style prompt ending with an open "\n\nAssistant:" header
        turns = parse_hh_dialogue(prompt, where)
        return turns[:-1] if turns[-1] == ("assistant", "") else turns
    return [Turn("user", prompt)]


def parse_preference_record(
    obj: Any, where: str = "record", allow_empty_response: bool = True
) -> PreferencePair:
    """One JSON object → a preference pair; ``prompt`` absent means hh-rlhf full dialogues."""
    obj = _object(obj, where)
    chosen = _field(obj, "chosen", str, where, "preference")
    rejected = _field(obj, "rejected", str, where, "preference")
    if "prompt" in obj:
        prompt = Conversation(tuple(_prompt_turns(obj["prompt"], where)), where)
        pair = PreferencePair(prompt, chosen.strip(), rejected.strip(), where)
    else:
        pair = split_hh_pair(chosen, rejected, where)
    if not pair.prompt.turns or not any(t.content.strip() for t in pair.prompt):
        raise DataError(f"{where}: empty prompt")
    if not allow_empty_response:
        for name in ("chosen", "rejected"):
            if not getattr(pair, name):
                raise DataError(f"{where}: empty {name} response")
    return pair


def _decode(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, nesting 3000 deep
        raise DataError(f"{where}: unreadable JSON ({type(e).__name__}: {str(e)[:80]})") from None


def read_jsonl(
    path: str | os.PathLike,
    parse: Callable[[Any, str], list[R]],
    on_error: OnError = "stop",
    stats: ReadStats | None = None,
) -> Iterator[R]:
    """The records ``parse(object, where)`` makes of each line of a JSONL file (``.gz`` too),
    the one JSONL reader of lmtrain's inputs. Checks the arguments now (not at first ``next``),
    then returns the record iterator."""
    if on_error not in ("stop", "skip"):
        raise DataError(f"on_error={on_error!r}: use 'stop' or 'skip'")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" + missing_hint(path))
    return _iter_jsonl(path, parse, on_error, stats if stats is not None else ReadStats())


def _iter_jsonl(
    path: Path, parse: Callable[[Any, str], list[R]], on_error: OnError, stats: ReadStats
) -> Iterator[R]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                stats.lines += 1
                where = f"{path}:{lineno}"
                try:
                    records = parse(_decode(raw, where), where)
                except DataError as e:
                    if on_error == "stop":
                        raise DataError(f"{e} (fix the line, or pass on_error='skip')") from None
                    stats.skipped += 1
                    if len(stats.errors) < MAX_KEPT_ERRORS:
                        stats.errors.append(str(e))
                    continue
                for r in records:
                    stats.records += 1
                    yield r
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if stats.skipped:
        log.warning(
            "%s: skipped %d/%d lines: %s", path, stats.skipped, stats.lines, stats.errors[0]
        )


def read_sft(
    path: str | os.PathLike,
    *,
    layout: str = "auto",
    on_error: OnError = "stop",
    stats: ReadStats | None = None,
) -> Iterator[Conversation]:
    """Yields one ``Conversation`` per SFT record (per instance for seed tasks)."""
    return read_jsonl(path, lambda o, w: parse_sft_record(o, w, layout), on_error, stats)


def read_alpaca_seed_tasks(
    path: str | os.PathLike, *, on_error: OnError = "stop", stats: ReadStats | None = None
) -> Iterator[Conversation]:
    """The Alpaca ``seed_tasks.jsonl`` layout: one conversation per instance."""
    return read_sft(path, layout="seed_tasks", on_error=on_error, stats=stats)


def read_preferences(
    path: str | os.PathLike,
    *,
    on_error: OnError = "stop",
    stats: ReadStats | None = None,
    allow_empty_response: bool = True,
) -> Iterator[PreferencePair]:
    """Yields preference pairs; ``allow_empty_response=False`` refuses empty chosen/rejected."""
    return read_jsonl(
        path, lambda o, w: [parse_preference_record(o, w, allow_empty_response)], on_error, stats
    )
