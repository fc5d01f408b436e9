"""Fine-tuning record parsers: every layout parses, bad lines name file:line, skip mode counts."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from lmtrain.data.formats import (
    Conversation,
    PreferencePair,
    ReadStats,
    parse_hh_dialogue,
    parse_preference_record,
    parse_sft_record,
    read_alpaca_seed_tasks,
    read_preferences,
    read_sft,
    split_hh_pair,
)
from lmtrain.errors import DataError
from tests.support.public_data import needs_public_data, public_file


def write_jsonl(path: Path, lines: list) -> Path:
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_sft_layouts_normalise_to_conversations(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl.gz",
        [
            {"prompt": "Hi?", "response": "Hello."},
            {"prompt": "Hi?", "response": "Hello.", "system": "Be brief."},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"instruction": "Add.", "input": "1+1", "output": "2"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            "",  # blank lines are ignored
        ],
    )
    stats = ReadStats()
    convs = list(read_sft(path, stats=stats))
    assert [c.turns for c in convs] == [
        (("user", "Hi?"), ("assistant", "Hello.")),
        (("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello.")),
        (("user", "a"), ("assistant", "b")),
        (("user", "Add.\n\n1+1"), ("assistant", "2")),
        (("user", "Say hi."), ("assistant", "hi")),
    ]
    assert convs[0].source == f"{path}:1"
    assert (stats.lines, stats.records, stats.skipped) == (5, 5, 0)


def test_alpaca_seed_tasks_one_record_per_instance(tmp_path):
    path = write_jsonl(
        tmp_path / "seed.jsonl",
        [
            {
                "id": "t0",
                "name": "x",
                "instruction": "Translate.",
                "instances": [{"input": "a", "output": "A"}, {"input": "", "output": "B"}],
                "is_classification": False,
            }
        ],
    )
    convs = list(read_alpaca_seed_tasks(path))
    assert [c.turns[0].content for c in convs] == ["Translate.\n\na", "Translate."]
    assert [c.turns[1].content for c in convs] == ["A", "B"]


@needs_public_data
def test_real_alpaca_seed_tasks():
    seed_file = public_file("alpaca-seed-tasks")
    rows = [json.loads(line) for line in seed_file.read_text().splitlines()]
    convs = list(read_alpaca_seed_tasks(seed_file))
    assert len(convs) == sum(len(r["instances"]) for r in rows) == 175
    assert all([t.role for t in c] == ["user", "assistant"] for c in convs)
    assert convs[0].turns[1].content == rows[0]["instances"][0]["output"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "response": ', "malformed JSON"),
        ('["not", "an", "object"]', "expected a JSON object, got list"),
        ('{"prompt": "a"}', "missing field 'response'"),
        ('{"prompt": "a", "response": 3}', "field 'response' must be a str, got int"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"messages": []}', "non-empty list"),
        ('{"instruction": "a", "input": "", "output": "  "}', "empty assistant response"),
        ('{"text": "pretraining text"}', "unknown SFT record"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, "", line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{re.escape(message)}"):
        list(read_sft(path))


def test_non_utf8_line_names_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not UTF-8"):
        list(read_sft(path))


def test_skip_mode_counts_and_keeps_messages(tmp_path):
    good = {"prompt": "a", "response": "b"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, "{oops", good, {"prompt": 1}, good])
    stats = ReadStats()
    convs = list(read_sft(path, on_error="skip", stats=stats))
    assert len(convs) == 3
    assert (stats.lines, stats.records, stats.skipped) == (5, 3, 2)
    assert stats.errors[0].startswith(f"{path}:2: malformed JSON")
    assert stats.errors[1].startswith(f"{path}:4: ")


def test_reader_argument_errors_are_eager(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_sft(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="on_error"):
        read_sft(path, on_error="ignore")
    with pytest.raises(DataError, match="SFT layout"):
        list(read_sft(path, layout="sharegpt"))


def test_corrupt_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="broken.jsonl.gz: cannot read"):
        list(read_sft(path))


def test_explicit_layout_is_enforced():
    record = {"prompt": "a", "response": "b"}
    assert parse_sft_record(record, layout="prompt_response")[0].turns[1] == ("assistant", "b")
    with pytest.raises(DataError, match="f.jsonl:3: field 'messages'"):
        parse_sft_record(record, where="f.jsonl:3", layout="chat")


def test_conversation_validates_roles():
    with pytest.raises(DataError, match="role"):
        Conversation((("narrator", "x"),))
    assert Conversation([("user", "x")]).turns == (("user", "x"),)


def test_preference_prompt_layouts():
    pair = parse_preference_record({"prompt": "Q?", "chosen": " good ", "rejected": "bad"})
    assert pair.prompt.turns == (("user", "Q?"),)
    assert (pair.chosen, pair.rejected) == ("good", "bad")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    pair = parse_preference_record({"prompt": msgs, "chosen": "a", "rejected": "b"})
    assert [t.role for t in pair.prompt] == ["system", "user"]
    hh = {"prompt": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: Q2\n\nAssistant:", "chosen": "x"}
    pair = parse_preference_record({**hh, "rejected": "y"})
    assert pair.prompt.turns == (("user", "Q"), ("assistant", "A"), ("user", "Q2"))
    with pytest.raises(DataError, match="missing field 'rejected'"):
        parse_preference_record({"prompt": "Q", "chosen": "a"}, where="f.jsonl:7")


def test_hh_split_at_last_shared_assistant_turn():
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me"
    pair = split_hh_pair(prefix + "\n\nAssistant: Sure.", prefix + "\n\nAssistant: No.")
    assert pair.prompt.turns == (("user", "Hi"), ("assistant", "Hello!"), ("user", "Help me"))
    assert (pair.chosen, pair.rejected) == ("Sure.", "No.")


def test_hh_split_when_dialogues_diverge_early():
    # The rejected dialogue has a different second human turn: the prompt is only what both
    # share up to an Assistant boundary, and each response keeps the rest as text.
    chosen = "\n\nHuman: Q\n\nAssistant: A1\n\nHuman: more\n\nAssistant: A2"
    rejected = "\n\nHuman: Q\n\nAssistant: B1"
    pair = split_hh_pair(chosen, rejected)
    assert pair.prompt.turns == (("user", "Q"),)
    assert pair.chosen == "A1\n\nHuman: more\n\nAssistant: A2"
    assert pair.rejected == "B1"


def test_hh_split_errors():
    with pytest.raises(DataError, match="identical"):
        split_hh_pair("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant: A")
    with pytest.raises(DataError, match="share no"):
        split_hh_pair("\n\nHuman: Q", "\n\nHuman: R")
    with pytest.raises(DataError, match="text before"):
        parse_hh_dialogue("preamble\n\nHuman: Q")
    empty = {"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: A"}
    assert parse_preference_record(empty).chosen == ""
    with pytest.raises(DataError, match="empty chosen response"):
        parse_preference_record(empty, allow_empty_response=False)


@needs_public_data
def test_real_hh_rlhf_harmless_test_parses_into_2312_pairs():
    hh_file = public_file("hh-rlhf-harmless")
    pairs = list(read_preferences(hh_file))
    assert len(pairs) == 2312
    assert all(isinstance(p, PreferencePair) for p in pairs)
    assert all(p.prompt.turns and p.prompt.turns[0].role == "user" for p in pairs)
    assert all(t.content for p in pairs for t in p.prompt if t.role == "user")
    assert all(p.rejected for p in pairs)
    # The file itself has 4 pairs whose chosen dialogue ends in an empty "Assistant:" turn
    # (lines 87, 517, 926, 1104): they are kept by default and refused on request.
    empty = [int(p.source.rsplit(":", 1)[1]) for p in pairs if not p.chosen]
    assert empty == [87, 517, 926, 1104]
    raws = [json.loads(line) for line in gzip.open(hh_file, "rt", encoding="utf-8")]
    for p, raw in zip(pairs, raws):
        assert raw["chosen"].rstrip().endswith(p.chosen)
        assert raw["rejected"].rstrip().endswith(p.rejected)
    stats = ReadStats()
    strict = list(
        read_preferences(hh_file, allow_empty_response=False, on_error="skip", stats=stats)
    )
    assert (len(strict), stats.skipped) == (2308, 4)
