"""Reward plug-ins for online RL: rules (exact match, regex format, code tests) and a reward model.

A reward is ``fn(prompts, completions) -> float32 array (N,)`` where ``prompts`` are
:class:`PromptRecord` (the prompt turns plus whatever the record carried: the reference answer,
code tests) and ``completions`` the decoded completions (end marker and EOS removed).
``config.rl.rewards`` names them and ``config.rl.reward_weights`` weighs them; the rollout logs
every component's mean as ``rollout/reward/<name>`` next to the weighted total.

Built in:

* ``exact_match`` — 1 when the completion equals the record's reference answer (whitespace at
  the ends ignored), else 0;
* ``format`` — 1 when the completion matches ``config.rl.format_regex`` (``re.fullmatch``, DOTALL);
* ``code`` — 1 when ``code_prompt + completion`` passes the record's ``test`` in the sandbox of
  lmtrain/sandbox/code_exec.py (HumanEval layout: ``entry_point`` adds ``check(entry_point)``); the
  rollout also logs pass@k over each prompt's group;
* ``reward_model`` — the score of a trained ``reward`` run (``config.rl.reward_model``, a workdir),
  batched over the training mesh; its tokenizer must be the policy's.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmtrain.errors import ConfigError
from lmtrain.sandbox.code_exec import ExecLimits, evaluate_pass_at_k

RewardFn = Callable[[Sequence["PromptRecord"], Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One RL prompt: the turns before the answer, the reference answer and extra fields."""

    turns: tuple  # ((role, content), ...), ending with a user turn
    reference: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""


def exact_match(prompts: Sequence[PromptRecord], completions: Sequence[str]) -> np.ndarray:
    return np.asarray(
        [c.strip() == p.reference.strip() for p, c in zip(prompts, completions)], np.float32
    )


def format_reward(pattern: str) -> RewardFn:
    if not pattern:
        raise ConfigError("reward 'format' needs config.rl.format_regex (a Python regex)")
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"config.rl.format_regex={pattern!r} is not a valid regex: {e}") from e

    def fn(prompts, completions):
        return np.asarray([rx.fullmatch(c) is not None for c in completions], np.float32)

    return fn


class CodeReward:
    """1 per completion that passes its record's tests; ``last_pass_at_k`` per group of samples."""

    def __init__(self, group_size: int, timeout_s: float = 5.0, allow: bool = False):
        self.group_size = group_size
        self.timeout_s = timeout_s
        self.allow = allow  # config.rl.allow_code_execution: the sandbox's explicit opt-in
        self.last_pass_at_k: dict[str, float] = {}

    def __call__(self, prompts, completions) -> np.ndarray:
        problems, samples, order = [], {}, []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if "test" not in p.extra:
                raise ConfigError(
                    f"reward 'code': prompt record {p.source or i} has no 'test' field (the "
                    "assertions its completion must pass)"
                )
            tid = f"{i // self.group_size}"
            if tid not in samples:
                problems.append(
                    {
                        "task_id": tid,
                        "test": p.extra["test"],
                        "prompt": p.extra.get("code_prompt", ""),
                        "entry_point": p.extra.get("entry_point"),
                    }
                )
                samples[tid] = []
            order.append((tid, len(samples[tid])))
            samples[tid].append(c)
        ks = sorted({1, self.group_size})
        kwargs = {"limits": ExecLimits(timeout_s=self.timeout_s)}
        if "allow" in inspect.signature(evaluate_pass_at_k).parameters:
            # None defers to the sandbox's environment opt-in; True is the config's explicit one
            kwargs["allow"] = True if self.allow else None
        out = evaluate_pass_at_k(problems, samples, ks, **kwargs)
        self.last_pass_at_k = dict(out["metrics"])
        statuses = {t: e["statuses"] for t, e in out["per_problem"].items()}
        return np.asarray([statuses[t][j] == "passed" for t, j in order], np.float32)


def combine(parts: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted sum of reward components."""
    total = None
    for name, r in parts.items():
        term = weights[name] * np.asarray(r, np.float32)
        total = term if total is None else total + term
    return total


def make_rewards(cfg, judge_factory: Callable[[], RewardFn] | None = None):
    """``({name: fn}, {name: weight})`` from ``config.rl.rewards`` / ``reward_weights``."""
    names = tuple(cfg.rl.rewards)
    weights = tuple(cfg.rl.reward_weights) or (1.0,) * len(names)
    if not names:
        raise ConfigError("config.rl.rewards is empty; name at least one, e.g. ('exact_match',)")
    if len(weights) != len(names):
        raise ConfigError(
            f"config.rl.reward_weights has {len(weights)} entries for {len(names)} rewards "
            f"{names}; give one weight per reward (or leave it empty for all 1.0)"
        )
    fns: dict[str, RewardFn] = {}
    for n in names:
        if n == "exact_match":
            fns[n] = exact_match
        elif n == "format":
            fns[n] = format_reward(cfg.rl.format_regex)
        elif n == "code":
            fns[n] = CodeReward(
                cfg.rl.group_size, cfg.rl.code_timeout_s, cfg.rl.get("allow_code_execution", False)
            )
        elif n == "reward_model":
            if judge_factory is None or not cfg.rl.reward_model:
                raise ConfigError("reward 'reward_model' needs config.rl.reward_model (a workdir)")
            fns[n] = judge_factory()
        else:
            raise ConfigError(
                f"config.rl.rewards: unknown reward {n!r}; use exact_match, format, code or "
                "reward_model"
            )
    return fns, dict(zip(names, (float(w) for w in weights)))
