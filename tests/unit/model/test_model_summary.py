"""The model summary (clu.parameter_overview) against the closed-form count and the params."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.model.config import ModelConfig
from lmtrain.model.summary import count_parameters, parameter_table, write_parameter_table
from lmtrain.model.transformer import Transformer

CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16
)


def abstract_params(cfg: ModelConfig):
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def test_table_lists_every_parameter_and_the_closed_form_total(tmp_path):
    boxed = abstract_params(CFG)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    table = parameter_table(boxed)
    for path, leaf in flat:
        name = "/".join(str(k.key) for k in path)
        row = next(line for line in table.splitlines() if f"| {name} " in line)
        assert str(tuple(leaf.shape)) in row and f"{int(np.prod(leaf.shape)):,}" in row
    total = CFG.param_count()
    assert count_parameters(boxed) == total == sum(int(np.prod(x.shape)) for _, x in flat)
    assert re.search(rf"Total: {total:,} -- {4 * total:,} bytes", table)
    path = write_parameter_table(boxed, str(tmp_path))
    assert open(path).read() == table + "\n"


def test_table_of_real_params_matches_the_abstract_one():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True, "qkv_bias": True})
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert parameter_table(params) == parameter_table(abstract_params(cfg))
    assert count_parameters(params) == cfg.param_count()
