"""Tiny tokenizer, model and SFT/preference batches shared by the fine-tuning tests."""

from __future__ import annotations

import string

import flax.linen as nn
import jax
import numpy as np

from lmtrain.config import base_config
from lmtrain.data.chat_template import ChatTemplate
from lmtrain.data.formats import PreferencePair
from lmtrain.data.sft import build_preference_example, build_sft_example
from lmtrain.data.tokenizer import CHAT_SPECIALS, CharTokenizer
from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer

TOK = CharTokenizer.train(
    [string.ascii_lowercase + string.digits + " +=?\n"], extra_specials=CHAT_SPECIALS
)
TEMPLATE = ChatTemplate()
SEQ = 24


def tiny_model(vocab: int = TOK.vocab_size, d_model: int = 32, n_layers: int = 2) -> Transformer:
    return Transformer(
        ModelConfig(
            vocab_size=vocab,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=4,
            n_kv_heads=2,
            d_ff=64,
            max_seq_len=SEQ,
            dtype="float32",
        )
    )


def init_params(model: Transformer, seed: int = 0) -> dict:
    return nn.meta.unbox(
        model.init(jax.random.PRNGKey(seed), np.zeros((1, SEQ), np.int32))["params"]
    )


def config(objective: str, **dpo):
    c = base_config()
    c.objective = objective
    c.dpo.update(**dpo)
    return c


PAIRS = [
    PreferencePair([("user", "2+3=?")], "5", "6"),
    PreferencePair([("user", "rev abc")], "cba", "abc"),
    PreferencePair([("user", "sort 312")], "123", "132"),
    PreferencePair([("user", "9+9=?")], "18", "19"),
]


def preference_batch(pairs=PAIRS) -> dict[str, np.ndarray]:
    rows = [
        build_preference_example(p.prompt, p.chosen, p.rejected, TOK, TEMPLATE, SEQ) for p in pairs
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def sft_batch(convs) -> dict[str, np.ndarray]:
    rows = [build_sft_example(c, TOK, TEMPLATE, SEQ) for c in convs]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
