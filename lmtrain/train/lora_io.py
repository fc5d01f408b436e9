"""LoRA adapters on their own: small files, and the combined tree export tools merge.

A LoRA run writes ``<workdir>/adapters/``:

* ``adapter_model.safetensors`` — one tensor per leaf, named by its path in the adapter tree
  (``layers_0/attn/q_kernel/a``; layout in lmtrain/model/lora.py), float32;
* ``adapter_config.json`` — ``rank``, ``alpha``, ``dropout``, ``targets``, ``step``,
  ``init_from`` (the base run) and the base model config.

``load_lora_run(workdir)`` rebuilds the combined tree ``{**base, "lora": {...}}`` from a LoRA run:
the base from its ``init_from`` checkpoint (or the seed's init when it had none) plus the saved
adapters, ready for ``lora.merge``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np

from lmtrain.errors import CheckpointError
from lmtrain.model import lora
from lmtrain.model.config import ModelConfig
from lmtrain.model.param_tree import flatten, unflatten
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import finetune, run_loader

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def save_adapters(directory: str, adapters: Mapping, config, *, step: int | None = None) -> str:
    """Writes the adapter tree and its settings; returns the weights file's path."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flatten(adapters).items()}
    path = os.path.join(directory, WEIGHTS_FILE)
    save_file(flat, path + ".tmp")
    os.replace(path + ".tmp", path)
    meta = {
        "rank": int(config.lora.rank),
        "alpha": float(config.lora.alpha),
        "dropout": float(config.lora.dropout),
        "targets": list(lora.resolve_targets(config.lora.targets)),
        "step": step,
        "init_from": os.path.abspath(config.init_from) if config.init_from else "",
        "seed": int(config.seed),
        "model": config.model.to_dict(),
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return path


def load_adapters(directory: str) -> tuple[dict, dict]:
    """``(adapter tree of numpy arrays, settings)`` written by ``save_adapters``."""
    from safetensors.numpy import load_file

    weights, cfg = (os.path.join(directory, n) for n in (WEIGHTS_FILE, CONFIG_FILE))
    for p in (weights, cfg):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} not found; a LoRA run writes it to <workdir>/adapters")
    with open(cfg) as f:
        meta = json.load(f)
    adapters = unflatten(load_file(weights))
    rank = lora.adapter_rank(adapters)
    if rank != meta["rank"]:
        raise CheckpointError(f"{weights}: adapters have rank {rank} but {cfg} says {meta['rank']}")
    return adapters, meta


def load_lora_run(workdir: str) -> dict:
    """Combined tree (numpy) of a LoRA run: base params + ``{"lora": {alpha, adapters}}``."""
    adapters, meta = load_adapters(os.path.join(workdir, "adapters"))
    model = Transformer(ModelConfig.from_config(meta["model"]))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    seq_len = 8
    abstract, shardings = finetune.abstract_params(model, seq_len, mesh)
    with mesh:
        if meta["init_from"]:
            base = finetune.restore_run_params(meta["init_from"], abstract, shardings)
        else:
            base = run_loader.seed_params(model, seq_len, meta["seed"], shardings)
    return lora.combine(jax.device_get(base), adapters, meta["alpha"])
