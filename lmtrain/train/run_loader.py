"""Loading a run from its workdir: config, tokenizer and plain params (LoRA merged once).

Everything that reads a finished run goes through here: a new run's ``init_from``, ``lmtrain
generate`` and ``eval`` (``lmtrain.infer.loader`` places the params on the run's mesh), ``lmtrain
serve`` and the exports. It sits below the trainer (it never imports the training loop or
``finetune``), so the trainer and the faces above it can all use it.

A workdir holds ``config.json`` (the resolved config), ``checkpoints/<step>/`` (Orbax: items
``state`` and ``iter``; ``checkpoints_best/`` with ``train.keep_best_metric``) and a tokenizer:
``tokenizer/`` in the workdir (imported models, fine-tuning runs), else
``<config.data.dir>/tokenizer`` or ``data/tokenizer`` (trained runs). Params are read in the
checkpoint's own tree, so LoRA adapters come back as saved; :func:`plain_params` folds them into
their base.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lmtrain.config import base_config, check_against_schema
from lmtrain.data.tokenizer import Tokenizer, load_tokenizer
from lmtrain.errors import CheckpointError, DataError
from lmtrain.model import lora
from lmtrain.model.config import ModelConfig
from lmtrain.model.reward_head import HEAD_KEY
from lmtrain.model.transformer import Transformer
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.early_stop import BEST_DIR
from lmtrain.train.losses.rl import VALUE_KEY

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"


def read_config_json(workdir: str) -> dict:
    """The saved ``config.json`` of a workdir as a plain dict."""
    path = os.path.join(workdir, CONFIG_JSON)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{workdir} is not an lmtrain workdir: {CONFIG_JSON} is missing (train a model or run "
            "`lmtrain import hf` first)"
        )
    with open(path) as f:
        return json.load(f)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config on today's schema: saved keys checked against it, keys added since the
    run was trained with their defaults."""
    saved = read_config_json(workdir)
    check_against_schema(ml_collections.ConfigDict(saved), base_config())
    cfg = base_config()
    _merge(cfg, saved)
    return cfg


def _merge(base, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and hasattr(base.get(key), "items"):
            _merge(base[key], value)
        else:
            if isinstance(base.get(key), tuple) and isinstance(value, list):
                value = tuple(value)
            base[key] = value


def tokenizer_dir(workdir: str, cfg) -> str:
    candidates = [os.path.join(workdir, "tokenizer")]
    if cfg.data.dir:
        candidates.append(os.path.join(cfg.data.dir, "tokenizer"))
    candidates.append(os.path.join(workdir, "data", "tokenizer"))
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise DataError(f"no tokenizer for {workdir}: looked in {', '.join(candidates)}")


def choose_step(workdir: str, step: str | int | None = None, accept_unlisted: bool = False):
    """(step, its checkpoint directory): ``step`` None/"latest", "best" or a number; the step
    must be complete and pass its file listing."""
    sub = BEST_DIR if step == "best" else CHECKPOINTS
    ckpt_dir = os.path.join(workdir, sub)
    if not os.path.isdir(ckpt_dir):
        hint = " (set train.keep_best_metric when training)" if step == "best" else "; train first"
        raise CheckpointError(f"no checkpoint directory {ckpt_dir}{hint}")
    ckpt = Checkpointer(ckpt_dir, async_save=False, accept_unlisted=accept_unlisted)
    try:
        if step in (None, "latest", "best"):
            chosen = ckpt.latest_step()
        else:
            chosen = int(step)
            if chosen not in ckpt.all_steps():
                raise CheckpointError(
                    f"step {chosen} is not in {ckpt_dir}; available: {sorted(ckpt.all_steps())}"
                )
        if chosen is None:
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}; train first")
        problem = ckpt.verify(chosen)
        if problem is not None:
            raise CheckpointError(f"step {chosen} in {ckpt_dir} is corrupt: {problem}")
    finally:
        ckpt.close()
    return int(chosen), ckpt_dir


def read_params(ckpt_dir: str, step: int) -> dict:
    """Params of a checkpoint step as host numpy arrays, in the tree the checkpoint holds."""
    path = os.path.join(os.path.abspath(ckpt_dir), str(step), "state")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint step {step} not found under {ckpt_dir}")
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
    return jax.tree.map(np.asarray, out["params"])


def is_lora(config) -> bool:
    return config.lora.rank > 0


def plain_params(config, params, base=None) -> dict:
    """Plain model params for inference, the one LoRA merge of a run: a LoRA run's adapters
    (``params`` without an embedding) folded into ``base`` (the params they were trained over),
    a combined tree (base + ``lora`` entry) folded in place; the reward / value head dropped."""
    if lora.has_lora(params):
        params = lora.merge(params)
    body = {k: v for k, v in params.items() if k not in (HEAD_KEY, VALUE_KEY)}
    if is_lora(config) and "embedding" not in body:
        return lora.apply_adapters(base, body, config.lora.alpha / config.lora.rank)
    return body


def seed_params(model: Transformer, seq_len: int, seed: int, shardings=None) -> dict:
    """The plain params a run's fresh init creates for ``seed`` (same key split)."""

    def init():
        init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
        p = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return nn.meta.unbox(p)

    return jax.jit(init, out_shardings=shardings)()


def needs_base(config, params) -> bool:
    """True for a LoRA run's checkpoint: adapters only, their base comes from elsewhere."""
    return is_lora(config) and "embedding" not in params and not lora.has_lora(params)


def base_params(config) -> dict:
    """What a LoRA run's adapters sit on (host numpy): its ``init_from`` run's plain params
    (following that run's own chain), else the seed's init, as training used."""
    if config.init_from:
        return load_params(config.init_from)[0]
    model = Transformer(ModelConfig.from_config(config.model))
    return jax.device_get(seed_params(model, config.data.seq_len, config.seed))


def load_params(workdir: str, step: str | int | None = None, config=None) -> tuple[dict, int, str]:
    """(plain params on the host, step, checkpoint directory) of a run: LoRA merged, heads
    dropped. ``config``: the run's config when already read (with overrides)."""
    config = read_config(workdir) if config is None else config
    accept = bool(config.fault.get("accept_unlisted_checkpoints", False))
    chosen, ckpt_dir = choose_step(workdir, step, accept)
    params = read_params(ckpt_dir, chosen)
    base = base_params(config) if needs_base(config, params) else None
    return jax.tree.map(np.asarray, plain_params(config, params, base)), chosen, ckpt_dir


@dataclasses.dataclass
class LoadedModel:
    """A workdir's checkpoint as saved (``params`` may hold LoRA adapters only) with its config
    and tokenizer; ``plain_params()`` gives the model's own params."""

    workdir: str
    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer
    step: int

    @property
    def model(self) -> Transformer:
        return Transformer(self.model_cfg)

    @property
    def has_adapters(self) -> bool:
        return lora.has_lora(self.params) or needs_base(self.config, self.params)

    def plain_params(self) -> dict:
        """Plain params (host numpy): adapters folded into their base, heads dropped."""
        base = base_params(self.config) if needs_base(self.config, self.params) else None
        return jax.tree.map(np.asarray, plain_params(self.config, self.params, base))


def load_workdir(workdir: str, step: str | int | None = None) -> LoadedModel:
    """The checkpoint of ``workdir`` at ``step`` (None: latest) as saved, with its config and
    tokenizer."""
    cfg = read_config(workdir)
    tok = load_tokenizer(tokenizer_dir(workdir, cfg))
    with cfg.unlocked():
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = tok.vocab_size
    accept = bool(cfg.fault.get("accept_unlisted_checkpoints", False))
    chosen, ckpt_dir = choose_step(workdir, step, accept)
    params = read_params(ckpt_dir, chosen)
    return LoadedModel(workdir, cfg, ModelConfig.from_config(cfg.model), params, tok, chosen)
