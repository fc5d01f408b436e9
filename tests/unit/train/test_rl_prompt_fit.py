"""RL prompts go through the fine-tuning over-long policy (lmtrain/data/fit.py): cut from the left
or dropped, counted by reason in the console and metrics, refused above max_lost_fraction."""

import json

import pytest

from lmtrain.config import base_config
from lmtrain.errors import ConfigError, DataError
from lmtrain.train.config_check import validate
from lmtrain.train.loop import build, train
from lmtrain.train.rollout import RolloutSource
from tests.support.finetune_fixtures import TEMPLATE, TOK

SHORT = [f"{a}+{b}=?" for a, b in zip(range(8), range(8, 0, -1))]
LONG = ["what is " + "one plus " * 4 + "two", "add " + "nine " * 8]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlfit")
    TOK.save(str(d / "tok"))
    for name, prompts in (("train", SHORT + LONG), ("eval", SHORT[:3] + LONG[:1])):
        with open(d / f"{name}.jsonl", "w") as f:
            for p in prompts:
                f.write(json.dumps({"prompt": p, "answer": "1"}) + "\n")
    return d


def cfg_for(files, **data):
    c = base_config()
    c.objective = "grpo"
    c.model.update(
        d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=32, dtype="float32"
    )
    c.data.update(
        train_file=str(files / "train.jsonl"),
        eval_file=str(files / "eval.jsonl"),
        tokenizer=str(files / "tok"),
        seq_len=20,
    )
    c.data.update(**data)
    # budget: seq_len + 1 - max_new_tokens = 15 prompt tokens
    c.rl.update(group_size=2, max_new_tokens=6, rewards=("exact_match",))
    c.train.update(steps=1, global_batch_size=4, checkpoint_every=10**6, samples=0)
    c.fault.preflight = False
    c.mesh.num_devices = 1
    return c


def encoded(prompt: str) -> list[int]:
    return TEMPLATE.encode_generation_prompt([("user", prompt)], TOK)


def source(cfg, workdir, lines):
    return RolloutSource(build(cfg, str(workdir)), {}, None, str(workdir), lines.append)


def test_budget_of_the_fixture():
    assert all(len(encoded(p)) <= 15 for p in SHORT)
    assert all(len(encoded(p)) > 15 for p in LONG)


def test_long_prompts_keep_their_end_and_every_cut_is_counted(files, tmp_path):
    lines = []
    src = source(cfg_for(files), tmp_path, lines)
    assert len(src.records) == 10 and len(src.eval_records) == 4
    # the cut prompt is the last 15 tokens: the open assistant header the completion continues
    assert src.ids[:8] == [encoded(p) for p in SHORT]
    assert src.ids[8:] == [encoded(p)[-15:] for p in LONG]
    assert src.ids[9][-2:] == [TOK.token_id("<|assistant|>"), *TOK.encode("\n")]
    assert lines[0] == (
        f"{files}/train.jsonl: 10 RL prompts at max_prompt_len 15, truncation keep_end: "
        "8 whole, 2 cut (prompt_cut 2), 0 dropped = 0.0% lost"
    )
    assert lines[1].startswith(f"{files}/eval.jsonl: 4 RL prompts") and "1 cut" in lines[1]
    m = src.fit_metrics
    assert (m["data/train/examples"], m["data/train/kept"], m["data/train/prompt_cut"]) == (
        10,
        10,
        2,
    )
    assert (m["data/eval/examples"], m["data/eval/prompt_cut"], m["data/eval/too_long"]) == (
        4,
        1,
        0,
    )


def test_dropped_prompts_are_counted_and_a_run_losing_too_many_is_refused(files, tmp_path):
    lines = []
    src = source(cfg_for(files, truncation="drop", max_lost_fraction=0.3), tmp_path / "a", lines)
    assert src.ids == [encoded(p) for p in SHORT]
    assert src.fit_metrics["data/train/too_long"] == 2
    assert src.fit_metrics["data/train/lost_fraction"] == pytest.approx(0.2)
    assert "2 dropped (too_long 2) = 20.0% lost" in lines[0]
    with pytest.raises(DataError) as e:
        train(cfg_for(files, truncation="drop"), str(tmp_path / "b"), print_fn=lines.append)
    assert str(e.value) == (
        f"{files}/train.jsonl: 2 of 10 RL prompts (20.0%) do not fit max_prompt_len 15 with "
        "truncation='drop', more than config.data.max_lost_fraction=0.1; raise "
        "config.rl.max_prompt_len, choose another config.data.truncation, or raise "
        "config.data.max_lost_fraction"
    )
    assert not (tmp_path / "b" / "checkpoints").exists() or not any(
        (tmp_path / "b" / "checkpoints").iterdir()
    )


def test_max_prompt_len_sets_the_budget_and_is_validated(files, tmp_path):
    cfg = cfg_for(files)
    cfg.rl.max_prompt_len = 12
    lines = []
    src = source(cfg, tmp_path, lines)
    assert max(len(x) for x in src.ids) == 12
    assert "at max_prompt_len 12" in lines[0]
    cfg.rl.max_prompt_len = 16
    with pytest.raises(ConfigError, match=r"config.rl.max_prompt_len=16 must be in \[0, 15\]"):
        validate(cfg, 1)


def test_keep_start_would_cut_the_assistant_header_and_is_refused(files, tmp_path):
    with pytest.raises(DataError, match="truncation='keep_start' would cut the assistant header"):
        source(cfg_for(files, truncation="keep_start"), tmp_path, [])
