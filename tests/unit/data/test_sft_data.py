"""Chat template masks and SFT/preference examples: exact masks, lossless packing, truncation."""

from __future__ import annotations

import pickle
import random
import string

import numpy as np
import pytest

from lmtrain.data.chat_template import ChatTemplate
from lmtrain.data.formats import Conversation, read_preferences
from lmtrain.data.sft import (
    FIELDS,
    PreferenceExampleFn,
    SFTExampleFn,
    build_preference_example,
    build_sft_example,
    fit_example,
    pack_examples,
    tokenize_sft,
)
from lmtrain.data.tokenizer import CHAT_SPECIALS, CharTokenizer
from lmtrain.errors import DataError
from tests.support.public_data import needs_public_data, public_file

CONV = Conversation(
    (
        ("system", "Be kind."),
        ("user", "Hi there?"),
        ("assistant", "Hello!"),
        ("user", "Count to 3."),
        ("assistant", "1 2 3"),
    )
)


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train([string.printable], extra_specials=CHAT_SPECIALS)


def masked(ids, mask) -> list[int]:
    return [int(i) for i, m in zip(ids, mask) if m]


def test_default_template_layout(tok):
    t = ChatTemplate()
    text = t.render(CONV.turns[:3])
    assert (
        text
        == "<|system|>\nBe kind.<|end|>\n<|user|>\nHi there?<|end|>\n<|assistant|>\nHello!<|end|>"
    )
    sp = {s: tok.token_id(s) for s in CHAT_SPECIALS}
    nl = tok.encode("\n")
    ids, _ = t.encode(CONV.turns[:3], tok)
    assert ids == (
        [sp["<|system|>"], *nl, *tok.encode("Be kind."), sp["<|end|>"], *nl]
        + [sp["<|user|>"], *nl, *tok.encode("Hi there?"), sp["<|end|>"], *nl]
        + [sp["<|assistant|>"], *nl, *tok.encode("Hello!"), sp["<|end|>"], tok.eos_id]
    )


def test_loss_mask_is_exactly_assistant_content_end_and_eos(tok):
    end = tok.token_id("<|end|>")
    ids, mask = ChatTemplate().encode(CONV, tok)
    assert len(ids) == len(mask)
    want = [*tok.encode("Hello!"), end, *tok.encode("1 2 3"), end, tok.eos_id]
    assert masked(ids, mask) == want
    assert tok.decode(masked(ids, mask)) == "Hello!1 2 3"
    # Everything before the first assistant content is prompt/template: all zeros.
    first = ids.index(tok.token_id("<|assistant|>")) + 2  # marker + "\n"
    assert not any(mask[:first])
    assert mask[first - 1] == 0 and mask[first] == 1


def test_train_on_last_assistant_turn_only(tok):
    t = ChatTemplate(train_on_all_assistant_turns=False)
    ids, mask = t.encode(CONV, tok)
    assert masked(ids, mask) == [*tok.encode("1 2 3"), tok.token_id("<|end|>"), tok.eos_id]


def test_generation_prompt_ends_with_assistant_header(tok):
    t = ChatTemplate()
    ids = t.encode_generation_prompt(CONV.turns[:2], tok)
    assert ids[-2:] == [tok.token_id("<|assistant|>"), *tok.encode("\n")]
    assert tok.eos_id not in ids
    assert t.render(CONV.turns[:2], generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")


def test_template_is_configurable(tok):
    t = ChatTemplate(header_sep=": ", turn_sep="\n\n", add_bos=True)
    ids, mask = t.encode(CONV.turns[1:3], tok)
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert tok.decode(ids) == ": Hi there?\n\n: Hello!"  # decode drops the special markers
    plain = ChatTemplate(user="User:", assistant="Bot:", end="~", markers_are_special=False)
    ids, mask = plain.encode(CONV.turns[1:3], tok)
    assert tok.decode(ids) == "User:\nHi there?~\nBot:\nHello!~"
    assert masked(ids, mask) == [*tok.encode("Hello!~"), tok.eos_id]


def test_missing_specials_and_unknown_separators_are_clear_errors():
    bare = CharTokenizer.train([string.printable])
    with pytest.raises(DataError, match="CHAT_SPECIALS"):
        ChatTemplate().encode(CONV, bare)
    no_newline = CharTokenizer.train(["abc"], extra_specials=CHAT_SPECIALS)
    with pytest.raises(DataError, match="encodes to <unk>"):
        ChatTemplate().encode(CONV, no_newline)


def check_example(ex: dict, tok, max_len: int) -> None:
    assert set(ex) == set(FIELDS)
    for v in ex.values():
        assert v.shape == (max_len,) and v.dtype == np.int32
    pad = ex["segment_ids"] == 0
    assert tok.pad_id != tok.eos_id
    assert (ex["inputs"][pad] == tok.pad_id).all() and (ex["targets"][pad] == tok.pad_id).all()
    assert not ex["loss_mask"][pad].any() and not ex["positions"][pad].any()


def test_build_sft_example_shifts_and_pads(tok):
    ids, mask = ChatTemplate().encode(CONV, tok)
    ex = build_sft_example(CONV, tok, ChatTemplate(), 128)
    check_example(ex, tok, 128)
    n = len(ids) - 1
    assert (ex["inputs"][:n] == ids[:-1]).all() and (ex["targets"][:n] == ids[1:]).all()
    assert (ex["loss_mask"][:n] == mask[1:]).all()
    assert (ex["segment_ids"][:n] == 1).all() and (ex["segment_ids"][n:] == 0).all()
    assert (ex["positions"][:n] == np.arange(n)).all()
    assert tok.decode(ex["targets"][ex["loss_mask"] == 1]) == "Hello!1 2 3"
    assert ex["targets"][n - 1] == tok.eos_id and ex["loss_mask"][n - 1] == 1


def test_keep_start_truncation_keeps_the_start(tok):
    ids, _ = ChatTemplate().encode(CONV, tok)
    ex = build_sft_example(CONV, tok, ChatTemplate(), 40, truncation="keep_start")
    check_example(ex, tok, 40)
    assert (ex["inputs"] == ids[:40]).all() and (ex["targets"] == ids[1:41]).all()
    end = tok.token_id("<|end|>")
    assert masked(ex["targets"], ex["loss_mask"]) == [*tok.encode("Hello!"), end]
    # 21 ids hold no assistant token: dropped with its reason, not a row that trains nothing
    with pytest.raises(DataError, match=r"dropped \(no_trained_tokens\)"):
        build_sft_example(CONV, tok, ChatTemplate(), 20, truncation="keep_start")


def test_keep_end_truncation_keeps_the_whole_last_response(tok):
    conv = Conversation((("user", "x" * 60), ("assistant", "short answer")))
    ids, mask = ChatTemplate().encode(conv, tok)
    ex = build_sft_example(conv, tok, ChatTemplate(), 30)
    check_example(ex, tok, 30)
    assert (ex["targets"] == ids[-30:]).all()  # the last max_len+1 ids, nothing padded
    assert masked(ex["targets"], ex["loss_mask"]) == masked(ids, mask)
    assert tok.decode(ex["targets"][ex["loss_mask"] == 1]) == "short answer"
    # A response too long to fit even alone is dropped (and said so), never cut silently.
    long_conv = Conversation((("user", "question"), ("assistant", "y" * 80)))
    ex, reason = fit_example(tokenize_sft(long_conv, tok, ChatTemplate()), 30)
    assert ex is None and reason == "response_too_long"
    ids, _ = ChatTemplate().encode(long_conv, tok)
    ex, reason = fit_example(tokenize_sft(long_conv, tok, ChatTemplate()), 30, "keep_start")
    assert reason == "response_cut" and (ex.ids == ids[:31]).all()


def random_conv(rng: random.Random) -> Conversation:
    def words() -> str:
        return " ".join(rng.choice(["ab", "cd", "efg", "h"]) for _ in range(rng.randint(0, 6)))

    turns = [("user", words()), ("assistant", words() or "ok")]
    if rng.random() < 0.5:
        turns = [("system", words()), *turns, ("user", words()), ("assistant", words() or "k")]
    return Conversation(tuple(turns))


def unpack(row: dict) -> list[dict]:
    out = []
    for seg in range(1, int(row["segment_ids"].max()) + 1):
        sel = row["segment_ids"] == seg
        idx = np.flatnonzero(sel)
        assert (np.diff(idx) == 1).all(), "segments must be contiguous"
        assert (row["positions"][sel] == np.arange(sel.sum())).all()
        out.append({k: row[k][sel] for k in ("inputs", "targets", "loss_mask")})
    return out


def test_packing_is_lossless_first_fit(tok):
    rng = random.Random(0)
    t, max_len = ChatTemplate(), 64
    convs = [random_conv(rng) for _ in range(300)]
    rows, stats = pack_examples(
        (tokenize_sft(c, tok, t) for c in convs), max_len, pad_id=tok.pad_id
    )
    singles = [build_sft_example(c, tok, t, max_len) for c in convs]
    want = sorted(
        tuple(tuple(e[k][e["segment_ids"] == 1]) for k in ("inputs", "targets", "loss_mask"))
        for e in singles
    )
    got = []
    for row in rows:
        check_example(row, tok, max_len)
        got += [tuple(tuple(s[k]) for k in ("inputs", "targets", "loss_mask")) for s in unpack(row)]
    assert sorted(got) == want
    assert (stats.examples, stats.rows) == (300, len(rows))
    assert stats.truncated == sum(len(tokenize_sft(c, tok, t)) - 1 > max_len for c in convs) > 0
    assert stats.tokens == sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    assert len(rows) < 300 and stats.fill > 0.8


def test_first_fit_order_and_open_row_limit(tok):
    def ex(n):  # an example with n next-token pairs
        return tokenize_sft([("user", ""), ("assistant", "a" * (n - 7))], tok, ChatTemplate())

    rows, _ = pack_examples([ex(10), ex(12), ex(8), ex(9)], 20, pad_id=tok.pad_id)
    assert [np.bincount(r["segment_ids"])[1:].tolist() for r in rows] == [[10, 8], [12], [9]]
    rows, _ = pack_examples([ex(10), ex(12), ex(8)], 20, pad_id=tok.pad_id, max_open_rows=1)
    assert [np.bincount(r["segment_ids"])[1:].tolist() for r in rows] == [[10], [12, 8]]


def test_preference_example_masks_prompt_and_shares_it(tok):
    prompt = CONV.turns[:4]
    ex = build_preference_example(prompt, "Yes: 1 2 3", "No.", tok, ChatTemplate(), 96)
    end = tok.token_id("<|end|>")
    for side, text in (("chosen", "Yes: 1 2 3"), ("rejected", "No.")):
        part = {k: ex[f"{side}_{k}"] for k in FIELDS}
        check_example(part, tok, 96)
        assert masked(part["targets"], part["loss_mask"]) == [*tok.encode(text), end, tok.eos_id]
    n = len(ChatTemplate().encode_generation_prompt(prompt, tok))
    assert (ex["chosen_inputs"][:n] == ex["rejected_inputs"][:n]).all()
    # keep_end truncation drops the same prompt tokens from both sides.
    small = build_preference_example(prompt, "Yes: 1 2 3" * 3, "No.", tok, ChatTemplate(), 48)
    cut = len(tokenize_sft([*prompt, ("assistant", "Yes: 1 2 3" * 3)], tok, ChatTemplate())) - 49
    assert cut > 0
    m = n - cut
    assert (small["chosen_inputs"][:m] == small["rejected_inputs"][:m]).all()
    assert (small["chosen_inputs"][:m] == ex["chosen_inputs"][cut:n]).all()
    assert tok.decode(small["chosen_targets"][small["chosen_loss_mask"] == 1]) == "Yes: 1 2 3" * 3


def test_builders_are_picklable_grain_map_functions(tok):
    import grain

    fn = pickle.loads(pickle.dumps(SFTExampleFn(tok, ChatTemplate(), 64)))
    ds = grain.MapDataset.source([CONV, CONV]).map(fn)
    direct = build_sft_example(CONV, tok, ChatTemplate(), 64)
    assert all((ds[1][k] == direct[k]).all() for k in FIELDS)


@needs_public_data
def test_hh_pairs_become_preference_examples():
    pairs = list(read_preferences(public_file("hh-rlhf-harmless")))[:200]
    texts = ["\n"] + [t.content for p in pairs for t in p.prompt]
    texts += [p.chosen + p.rejected for p in pairs]
    tok = CharTokenizer.train(texts, extra_specials=CHAT_SPECIALS)
    fn = pickle.loads(pickle.dumps(PreferenceExampleFn(tok, ChatTemplate(), 4096)))
    for p in pairs:
        ex = fn(p)
        for side in ("chosen", "rejected"):
            got = ex[f"{side}_targets"][ex[f"{side}_loss_mask"] == 1]
            assert tok.decode(got) == getattr(p, side)
            assert got[-1] == tok.eos_id
