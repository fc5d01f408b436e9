"""Sequence-length warmup: bucketed lengths, rows split without losing tokens, bad settings named."""

import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.data.pipeline import (
    curriculum_batch,
    curriculum_seq_len,
    split_rows,
    windows_to_examples,
)
from lmtrain.errors import ConfigError
from lmtrain.train.config_check import validate


def test_lengths_double_in_equal_stages_then_stay_full():
    lengths = [curriculum_seq_len(s, 16, 300, 64) for s in range(400)]
    assert sorted(set(lengths)) == [16, 32, 64]  # three buckets: three compiles, not 300
    assert lengths[:100] == [16] * 100 and lengths[100:200] == [32] * 100
    assert set(lengths[200:]) == {64}
    assert curriculum_seq_len(5, 0, 0, 64) == 64  # off


def test_split_rows_keeps_every_token_mask_and_segment():
    rng = np.random.default_rng(0)
    batch = windows_to_examples(rng.integers(0, 5, (3, 65)).astype(np.int32), eos_id=0)
    short = split_rows(batch, 16)
    assert short["inputs"].shape == (12, 16)
    for k in batch:
        np.testing.assert_array_equal(short[k].reshape(batch[k].shape), batch[k])
    cfg = base_config().data
    cfg.curriculum_start_len, cfg.curriculum_steps = 16, 100
    assert curriculum_batch(batch, 0, cfg)["inputs"].shape == (12, 16)
    assert curriculum_batch(batch, 100, cfg)["inputs"].shape == (3, 64)


@pytest.mark.parametrize(
    ("start", "steps", "msg"), [(24, 100, "power of two"), (16, 0, "positive")]
)
def test_bad_settings_are_config_errors(start, steps, msg):
    c = base_config()
    c.data.path = "x.txt"
    c.data.seq_len = 64
    c.data.curriculum_start_len, c.data.curriculum_steps = start, steps
    with pytest.raises(ConfigError, match=f"curriculum.*{msg}"):
        validate(c, 1)
