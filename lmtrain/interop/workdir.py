"""Reading and writing lmtrain workdirs outside the training loop (import, export, serving).

A workdir holds ``config.json`` (the resolved config), ``checkpoints/<step>/`` (Orbax: items
``state`` and ``iter``) and a tokenizer: ``tokenizer/`` in the workdir (imported models), else
``<config.data.dir>/tokenizer`` or ``data/tokenizer`` (trained runs). Params are restored with
the checkpoint's own tree structure, so LoRA adapters or other extra params come back as saved.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lmtrain.config import base_config, check_against_schema
from lmtrain.data.tokenizer import Tokenizer, load_tokenizer
from lmtrain.errors import CheckpointError, DataError
from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer
from lmtrain.train.checkpoint import write_listing


@dataclasses.dataclass
class LoadedModel:
    workdir: str
    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer
    step: int

    @property
    def model(self) -> Transformer:
        return Transformer(self.model_cfg)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(
            f"{workdir} is not an lmtrain workdir: config.json is missing (train a model or run "
            "`lmtrain import hf` first)"
        )
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    check_against_schema(cfg, base_config())
    return cfg


def tokenizer_dir(workdir: str, cfg: ml_collections.ConfigDict) -> str:
    candidates = [os.path.join(workdir, "tokenizer")]
    if cfg.data.dir:
        candidates.append(os.path.join(cfg.data.dir, "tokenizer"))
    candidates.append(os.path.join(workdir, "data", "tokenizer"))
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise DataError(f"no tokenizer for {workdir}: looked in {', '.join(candidates)}")


def latest_step(workdir: str) -> int:
    root = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
    if not steps:
        raise CheckpointError(f"no checkpoint in {root}; train first or run `lmtrain import hf`")
    return max(steps)


def restore_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """Params of a checkpoint as host numpy arrays, in the tree the checkpoint holds."""
    step = latest_step(workdir) if step is None else step
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint step {step} not found under {workdir}/checkpoints")
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
        tree = dict(tree)["params"]
        sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree
        )
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
        out = ckptr.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )
    except Exception as e:  # noqa: BLE001 - orbax raises many types; wrap with context
        raise CheckpointError(f"could not read params of step {step} from {path}: {e}") from e
    return jax.tree.map(np.asarray, out["params"]), step


def load_workdir(workdir: str, step: int | None = None) -> LoadedModel:
    cfg = read_config(workdir)
    tok = load_tokenizer(tokenizer_dir(workdir, cfg))
    with cfg.unlocked():
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = tok.vocab_size
    params, step = restore_params(workdir, step)
    return LoadedModel(workdir, cfg, ModelConfig.from_config(cfg.model), params, tok, step)


def save_params(workdir: str, params: dict, step: int = 0) -> str:
    """Writes ``{'params': params}`` as an lmtrain checkpoint that ``restore_params`` reads."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    mgr = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=True), item_names=("state", "iter")
    )
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}), iter=ocp.args.JsonSave({})
        ),
        force=True,
    )
    mgr.wait_until_finished()
    mgr.close()
    step_dir = os.path.join(directory, str(step))
    # The file listing training checkpoints carry, so readers can verify this step too
    # (a step without one is refused). Written after the commit: no run is reading it yet.
    write_listing(step_dir)
    return step_dir
