"""Model defaults live in one place: ``ModelConfig`` (issue 19)."""

from __future__ import annotations

import dataclasses

from lmtrain.config import base_config
from lmtrain.model.config import ModelConfig


def test_base_config_model_section_is_model_config_defaults():
    section = dict(base_config().model)
    assert section.pop("vocab_size") == 0  # 0 = take it from the tokenizer
    defaults = ModelConfig.section_defaults()
    defaults.pop("vocab_size")
    assert section == defaults


def test_a_run_config_without_overrides_builds_the_default_model():
    cfg = base_config()
    cfg.model.vocab_size = 256
    built = ModelConfig.from_config(cfg.model)
    assert built == ModelConfig()
    assert (built.n_layers, built.d_ff) == (4, 352)
    assert set(ModelConfig.section_defaults()) == {f.name for f in dataclasses.fields(ModelConfig)}
