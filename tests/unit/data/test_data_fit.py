"""Over-long fine-tuning records: each policy's cuts and drops against hand counts, and refusal.

Every record is a prompt/response pair with the default template and special markers, so with a
char tokenizer a record of prompt length P and response length R has exactly P + R + 8 tokens:
``<|user|> \\n prompt <|end|> \\n <|assistant|> \\n response <|end|> </s>``; the last turn starts at
P + 4, and the first trained token (the response's first char) sits at P + 6.
"""

from __future__ import annotations

import string

import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.data import fit
from lmtrain.data.chat_template import ChatTemplate
from lmtrain.data.finetune_data import (
    preference_rows,
    rows_and_fit,
    sft_rows,
    write_jsonl,
)
from lmtrain.data.fit import FitStats, fit_prompt, fit_prompts
from lmtrain.data.formats import Conversation
from lmtrain.data.sft import build_sft_example, fit_example, tokenize_sft
from lmtrain.data.tokenizer import CHAT_SPECIALS, CharTokenizer
from lmtrain.errors import ConfigError, DataError
from lmtrain.train.config_check import validate

TOK = CharTokenizer.train([string.ascii_lowercase + "\n"], extra_specials=CHAT_SPECIALS)
TEMPLATE = ChatTemplate()
L = 32  # max_len: rows hold 33 ids

# (prompt length, response length, copies). Hand-derived fate at max_len 32 (limit 33 ids):
#   n = P + R + 8; keep_end cuts the prompt if the last turn (R + 4) fits 33, else drops;
#   keep_start keeps ids[:33], trained tokens left iff P + 6 <= 32.
SFT = [
    (5, 5, 3),  # n 18: fits
    (40, 5, 2),  # n 53: keep_end prompt_cut; keep_start no_trained_tokens
    (5, 40, 1),  # n 53: keep_end response_too_long; keep_start response_cut
    (20, 20, 1),  # n 48: keep_end prompt_cut; keep_start response_cut
]
SFT_WANT = {
    "keep_end": {"prompt_cut": 3, "response_too_long": 1},
    "keep_start": {"response_cut": 2, "no_trained_tokens": 2},
    "drop": {"too_long": 4},
}


def record(p: int, r: int) -> dict:
    return {"prompt": "p" * p, "response": "r" * r}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "sft.jsonl"
    write_jsonl(str(path), [record(p, r) for p, r, k in SFT for _ in range(k)])
    return str(path)


def test_record_lengths_are_what_the_hand_counts_assume():
    for p, r, _ in SFT:
        ex = tokenize_sft([("user", "p" * p), ("assistant", "r" * r)], TOK, TEMPLATE)
        assert (len(ex), ex.response_start) == (p + r + 8, p + 4)
        assert int(np.flatnonzero(ex.loss_mask)[0]) == p + 6


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("truncation", ["keep_end", "keep_start", "drop"])
def test_sft_counts_match_hand_counts(sft_file, truncation, packing):
    stats = FitStats("SFT examples", L, truncation, sft_file)
    rows, pack = sft_rows(
        sft_file, TOK, TEMPLATE, L, packing=packing, truncation=truncation, fit_stats=stats
    )
    want = SFT_WANT[truncation]
    assert {k: v for k, v in stats.reasons.items() if v} == want
    dropped = sum(v for k, v in want.items() if k in fit.DROPS)
    assert (stats.seen, stats.dropped, stats.kept) == (7, dropped, 7 - dropped)
    assert pack.examples == 7 - dropped  # exactly the kept examples are in the rows
    assert int(sum(r.max() for r in rows["segment_ids"])) == 7 - dropped
    m = stats.metrics("data/train/")
    assert m["data/train/examples"] == 7 and m["data/train/lost_fraction"] == dropped / 7
    assert all(m[f"data/train/{r}"] == want.get(r, 0) for r in (*fit.CUTS, *fit.DROPS))


def test_keep_end_keeps_the_response_and_its_eos():
    conv = Conversation((("user", "p" * 40), ("assistant", "r" * 5)))
    ids, mask = TEMPLATE.encode(conv, TOK)
    ex, reason = fit_example(tokenize_sft(conv, TOK, TEMPLATE), L, "keep_end")
    assert reason == "prompt_cut" and len(ex) == L + 1
    assert (ex.ids == ids[-(L + 1) :]).all()  # the oldest prompt tokens went
    row = build_sft_example(conv, TOK, TEMPLATE, L)
    trained = row["targets"][row["loss_mask"] == 1]
    assert TOK.decode(trained) == "rrrrr"  # all of the response ...
    assert trained[-2] == TOK.token_id("<|end|>") and trained[-1] == TOK.eos_id  # ... end, EOS
    assert row["targets"][-1] == TOK.eos_id and row["loss_mask"][-1] == 1
    assert int(row["loss_mask"].sum()) == int(np.sum(mask))  # no trained token lost
    # the assistant header is in the row, right before the response
    header = TOK.token_id("<|assistant|>")
    assert row["inputs"][ex.response_start] == header


def test_keep_start_and_drop_and_what_a_single_builder_says():
    long_response = Conversation((("user", "p" * 5), ("assistant", "r" * 40)))
    ex, reason = fit_example(tokenize_sft(long_response, TOK, TEMPLATE), L, "keep_start")
    assert reason == "response_cut" and TOK.eos_id not in ex.ids.tolist()
    with pytest.raises(DataError, match=r"dropped \(response_too_long\).*max_len=32"):
        build_sft_example(long_response, TOK, TEMPLATE, L)
    ex, reason = fit_example(tokenize_sft(long_response, TOK, TEMPLATE), L, "drop")
    assert ex is None and reason == "too_long"
    with pytest.raises(DataError, match="truncation='sideways'"):
        fit_example(tokenize_sft(long_response, TOK, TEMPLATE), L, "sideways")
    # the earlier names still mean what they meant when nothing is dropped
    assert fit.policy("left_prompt") == "keep_end" and fit.policy("right") == "keep_start"


# (prompt length, chosen length, rejected length). At max_len 32:
#   fits | keep_end cuts the same 20 prompt tokens from both (keep_start: no trained token left)
#   | keep_end: the chosen turn (44) exceeds the row (keep_start: the chosen side is cut)
PAIRS = [(5, 5, 3), (40, 5, 2), (5, 40, 3)]
PAIRS_WANT = {
    "keep_end": {"prompt_cut": 1, "response_too_long": 1},
    "keep_start": {"response_cut": 1, "no_trained_tokens": 1},
    "drop": {"too_long": 2},
}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "pairs.jsonl"
    recs = [{"prompt": "p" * p, "chosen": "c" * c, "rejected": "r" * r} for p, c, r in PAIRS]
    write_jsonl(str(path), recs)
    return str(path)


@pytest.mark.parametrize("truncation", ["keep_end", "keep_start", "drop"])
def test_preference_counts_match_hand_counts(pairs_file, truncation):
    stats = FitStats("preference pairs", L, truncation, pairs_file)
    rows = preference_rows(pairs_file, TOK, TEMPLATE, L, truncation=truncation, fit_stats=stats)
    assert {k: v for k, v in stats.reasons.items() if v} == PAIRS_WANT[truncation]
    assert len(rows["chosen_inputs"]) == stats.kept == 3 - stats.dropped
    # every kept pair has trained tokens on both sides (none left for the loss to skip silently)
    assert (rows["chosen_loss_mask"].sum(-1) > 0).all()
    assert (rows["rejected_loss_mask"].sum(-1) > 0).all()
    if truncation == "keep_end":  # the cut pair: same context, both responses and EOS whole
        cut = {k: v[1] for k, v in rows.items()}
        for side, text in (("chosen", "c" * 5), ("rejected", "r" * 2)):
            got = cut[f"{side}_targets"][cut[f"{side}_loss_mask"] == 1]
            assert TOK.decode(got) == text and got[-1] == TOK.eos_id
        n = 40 + 4 - 20  # prompt tokens left before the assistant header
        assert (cut["chosen_inputs"][: n + 2] == cut["rejected_inputs"][: n + 2]).all()


def run_config(path: str, **data):
    c = base_config()
    c.objective = "sft"
    c.data.update(train_file=path, seq_len=L, **data)
    return c


def test_refusal_names_the_key_and_the_counts(sft_file):
    cfg = run_config(sft_file, max_lost_fraction=0.1)  # keep_end loses 1 of 7
    with pytest.raises(DataError) as e:
        rows_and_fit(cfg, TOK, sft_file)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 of 7 SFT examples (14.3%) do not fit seq_len 32" in msg
    assert "truncation='keep_end'" in msg and "config.data.max_lost_fraction=0.1" in msg
    cfg = run_config(sft_file, max_lost_fraction=0.15)
    rows, stats = rows_and_fit(cfg, TOK, sft_file)
    assert stats.summary() == (
        f"{sft_file}: 7 SFT examples at seq_len 32, truncation keep_end: 3 whole, 3 cut "
        "(prompt_cut 3), 1 dropped (response_too_long 1) = 14.3% lost"
    )
    cfg = run_config(sft_file, max_lost_fraction=0.5, truncation="drop")  # 4 of 7 dropped
    with pytest.raises(DataError, match="4 of 7 SFT examples"):
        rows_and_fit(cfg, TOK, sft_file)


def test_config_keys_are_validated():
    cfg = run_config("x.jsonl", truncation="middle")
    with pytest.raises(ConfigError, match="config.data.truncation='middle'"):
        validate(cfg, 1)
    cfg = run_config("x.jsonl", max_lost_fraction=1.5)
    with pytest.raises(ConfigError, match="config.data.max_lost_fraction=1.5"):
        validate(cfg, 1)


def test_rl_prompts_keep_their_end_or_drop():
    header = TEMPLATE.encode_generation_prompt([("user", "p" * 30)], TOK)
    kept, reason = fit_prompt(header, 10)
    assert reason == "prompt_cut" and kept == header[-10:]
    assert kept[-2:] == [TOK.token_id("<|assistant|>"), *TOK.encode("\n")]
    assert fit_prompt(header, len(header)) == (header, None)
    assert fit_prompt(header, 10, "drop") == (None, "too_long")
    with pytest.raises(DataError, match="truncation='keep_start' would cut the assistant header"):
        fit_prompt(header, 10, "keep_start")
    stats = FitStats("RL prompts", 10, "drop", "p.jsonl", limit_key="config.rl.max_prompt_len")
    out = list(fit_prompts([header, header[-5:], header[-10:]], 10, "drop", stats))
    assert out == [header[-5:], header[-10:]]
    assert (stats.seen, stats.dropped, stats.reasons["too_long"]) == (3, 1, 1)
    assert stats.summary() == (
        "p.jsonl: 3 RL prompts at max_prompt_len 10, truncation drop: 2 whole, 0 cut, "
        "1 dropped (too_long 1) = 33.3% lost"
    )
    with pytest.raises(DataError, match=r"do not fit max_prompt_len 10 .* config\.rl\.max_pr"):
        stats.check(0.2)


def loop_config(tmp_path, sft_file: str, **data):
    c = base_config()
    c.objective = "sft"
    TOK.save(str(tmp_path / "tok"))
    c.data.update(train_file=sft_file, eval_file=sft_file, tokenizer=str(tmp_path / "tok"))
    c.data.update(**{"seq_len": L, "max_lost_fraction": 0.15, **data})
    c.model.update(
        d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=L, dtype="float32"
    )
    c.train.update(
        steps=1,
        global_batch_size=2,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
        checkpoint_every=1000,
        samples=0,
        async_checkpoint=False,
    )
    c.optim.update(warmup_steps=0)
    c.mesh.update(shape=(1, 1, 1), num_devices=1)
    return c


@pytest.mark.slow  # end-to-end: a training run
def test_the_loop_prints_one_summary_line_per_file_and_logs_the_counts(tmp_path, sft_file):
    import json

    from lmtrain.train.loop import train

    lines = []
    train(loop_config(tmp_path, sft_file), str(tmp_path / "run"), print_fn=lines.append)
    want = (
        f"{sft_file}: 7 SFT examples at seq_len 32, truncation keep_end: 3 whole, 3 cut "
        "(prompt_cut 3), 1 dropped (response_too_long 1) = 14.3% lost"
    )
    assert lines.count(want) == 2  # train file, eval file
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    for split in ("train", "eval"):
        assert first[f"data/{split}/examples"] == 7 and first[f"data/{split}/kept"] == 6
        assert first[f"data/{split}/prompt_cut"] == 3
        assert first[f"data/{split}/response_too_long"] == 1
        assert first[f"data/{split}/no_trained_tokens"] == 0
    # The same data with a tighter limit is refused before any step, naming the key.
    cfg = loop_config(tmp_path, sft_file, max_lost_fraction=0.1)
    with pytest.raises(DataError, match=r"1 of 7 SFT examples .*config\.data\.max_lost_fraction"):
        train(cfg, str(tmp_path / "refused"), print_fn=lines.append)
