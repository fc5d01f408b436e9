"""Tiny models and corpora for fast tests (no download: the text comes from Python itself)."""

from __future__ import annotations

import inspect
import os
import random

import ml_collections

from lmtrain.config import base_config


def write_tiny_text(path: os.PathLike, chars: int = 60_000) -> str:
    """Real English prose (docstrings of the standard library), shuffled by paragraph, fixed seed."""
    import collections
    import json
    import pathlib
    import textwrap

    paras = []
    for mod in (collections, json, pathlib, textwrap, random, inspect):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                paras.append(doc)
    paras = sorted(set(paras))
    random.Random(0).shuffle(paras)
    text = "\n\n".join(paras)
    while len(text) < chars:
        text += "\n\n" + text
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:chars])
    return str(path)


def tiny_config(text_path: str, **train) -> ml_collections.ConfigDict:
    c = base_config()
    c.data.path = text_path
    c.data.seq_len = 32
    c.model.update(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, dtype="float32"
    )
    c.train.update(
        steps=8,
        global_batch_size=16,
        log_every=4,
        eval_every=1000,
        eval_batches=2,
        checkpoint_every=4,
        samples=0,
        async_checkpoint=False,
    )
    c.train.update(**train)
    c.optim.update(lr=3e-3, warmup_steps=2, decay_steps=8, min_lr=3e-4)
    c.mesh.shape = (-1, 1, 1)
    return c
