"""Reward plug-ins and RL prompt records: rules, code tests in the sandbox, weights, errors."""

import json

import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.errors import ConfigError, DataError
from lmtrain.train import rewards
from lmtrain.train.config_check import validate
from lmtrain.train.rewards import PromptRecord
from lmtrain.train.rollout import parse_prompt_record, read_prompts


def cfg(**rl):
    c = base_config()
    c.rl.update(**rl)
    return c


def test_exact_match_format_and_weighted_sum():
    p = [PromptRecord((("user", "add 2 3"),), "5")] * 3
    fns, w = rewards.make_rewards(
        cfg(rewards=("exact_match", "format"), reward_weights=(1.0, 0.5), format_regex=r"\d+")
    )
    comps = ["5", " 5 ", "6x"]
    parts = {n: fn(p, comps) for n, fn in fns.items()}
    np.testing.assert_array_equal(parts["exact_match"], [1, 1, 0])
    np.testing.assert_array_equal(parts["format"], [1, 0, 0])  # fullmatch: spaces fail
    np.testing.assert_allclose(rewards.combine(parts, w), [1.5, 1.0, 0.0])


def test_code_reward_runs_the_tests_in_the_sandbox_and_reports_pass_at_k():
    rec = PromptRecord(
        (("user", "write add"),), "", {"test": "assert add(2, 3) == 5", "code_prompt": ""}
    )
    fn = rewards.CodeReward(group_size=2, timeout_s=10, allow=True)
    good = "def add(a, b):\n    return a + b"
    bad = "def add(a, b):\n    return a - b"
    np.testing.assert_array_equal(fn([rec, rec], [good, bad]), [1.0, 0.0])
    assert fn.last_pass_at_k["pass@1"] == pytest.approx(0.5)
    assert fn.last_pass_at_k["pass@2"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no 'test' field"):
        fn([PromptRecord((("user", "x"),))], ["pass"])


def test_reward_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="reward_weights has 1 entries for 2"):
        rewards.make_rewards(cfg(rewards=("exact_match", "format"), reward_weights=(1.0,)))
    with pytest.raises(ConfigError, match="unknown reward 'bleu'"):
        rewards.make_rewards(cfg(rewards=("bleu",)))
    with pytest.raises(ConfigError, match="format_regex"):
        rewards.make_rewards(cfg(rewards=("format",)))
    with pytest.raises(ConfigError, match="needs config.rl.reward_model"):
        rewards.make_rewards(cfg(rewards=("reward_model",)))
    c = cfg(loss_norm="mean")
    c.objective, c.data.train_file = "grpo", "x.jsonl"
    with pytest.raises(ConfigError, match="config.rl.loss_norm='mean'"):
        validate(c, 1)
    c = cfg(group_size=3)
    c.objective, c.data.train_file = "grpo", "x.jsonl"
    with pytest.raises(ConfigError, match="multiple of config.rl.group_size=3"):
        validate(c, 1)


def test_prompt_records_from_sft_chat_preference_and_prompt_only_layouts(tmp_path):
    recs = [
        {"prompt": "add 1 2", "response": "3"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {
            "chosen": "\n\nHuman: hey\n\nAssistant: hello",
            "rejected": "\n\nHuman: hey\n\nAssistant: go",
        },
        {"prompt": "2+2", "answer": "4", "test": "assert True"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_prompts(str(path))
    assert [(g.turns[-1], g.reference) for g in got] == [
        (("user", "add 1 2"), "3"),
        (("user", "hi"), "yo"),
        (("user", "q"), "good"),
        (("user", "hey"), "hello"),
        (("user", "2+2"), "4"),
    ]
    assert got[4].extra == {"test": "assert True"}
    with pytest.raises(DataError, match="p.jsonl:1"):
        parse_prompt_record({"prompt": ""}, f"{path}:1")
