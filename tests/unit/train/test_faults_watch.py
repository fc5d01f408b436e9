"""The trainer's loss warnings: spikes over the recent median are reported for losses that should
fall (lm, sft, ...) and not for RL objectives, whose advantage-weighted loss sits near zero."""

from __future__ import annotations

import types

import pytest

from lmtrain.config import base_config
from lmtrain.train.faults import Faults

# An RL-like loss: small, both signs, then one step far above the recent median (a "spike" by
# the rule for losses that should fall) and a rise from the start to the end.
LOSSES = [0.001 * (1 + i % 3) for i in range(60)] + [0.05] + [0.004 * (1 + i % 2) for i in range(9)]
SPIKY = list(enumerate(LOSSES, 1))


def faults_for(objective: str, lines: list[str]) -> Faults:
    cfg = base_config()
    cfg.objective = objective
    setup = types.SimpleNamespace(config=cfg)
    return Faults(setup, "unused", None, None, None, last_saved=0, group=1, print_fn=lines.append)


@pytest.mark.parametrize("objective,warned", [("lm", True), ("grpo", False), ("ppo", False)])
def test_spike_warnings_only_for_losses_that_should_fall(objective, warned):
    lines: list[str] = []
    f = faults_for(objective, lines)
    rows = [(s, {"loss": v, "skipped": False}) for s, v in SPIKY]
    assert f.check(rows, state=None, close=lambda: None) is None
    final = f.finish()
    spiked = any("loss spike" in line for line in lines)
    assert spiked == warned
    assert bool(final) == warned
