"""What the loop needs beyond pre-training: init_from, params transforms, frozen trees, records.

* ``config.init_from`` (an lmtrain workdir): the model architecture and tokenizer come from that
  run; its latest checkpoint's params start this one. A different tokenizer (fingerprint) or
  vocabulary size is refused before anything is restored.
* Params transforms at init: LoRA (trainable state = adapters only, lmtrain/model/lora.py) and
  the reward head (lmtrain/model/reward_head.py).
* Frozen trees passed to the step: ``base`` (LoRA), ``reference`` (DPO with
  ``config.dpo.reference='params'``), ``teacher`` (distillation). The reference is the run's
  initial params (init_from, else the seed's init), so DPO starts at loss ln 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.data import finetune_data
from lmtrain.data.tokenizer import Tokenizer, load_tokenizer
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.model import lora
from lmtrain.model.config import ModelConfig
from lmtrain.model.reward_head import HEAD_KEY, init_reward_head
from lmtrain.model.sharding import LOGICAL_RULES, logical_shardings, mesh_rules
from lmtrain.model.transformer import Transformer
from lmtrain.rl_config import RL_OBJECTIVES
from lmtrain.train import run_loader
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.losses.dpo import pair_logps
from lmtrain.train.losses.rl import VALUE_KEY, init_value_head

# Model keys that fix the param tree or its meaning; taken from the init_from run.
ARCH_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ff",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "qkv_bias",
    "embed_scale",
    "mlp_activation",
)


def uses_records(config) -> bool:
    """True when the run reads JSONL fine-tuning records instead of token shards."""
    return bool(config.data.train_file)


def lora_enabled(config) -> bool:
    return run_loader.is_lora(config)


def read_run(workdir: str) -> tuple[dict, dict]:
    """``(config, run manifest)`` of an lmtrain workdir, with a clear error when it is not one."""
    paths = [os.path.join(workdir, n) for n in ("config.json", "run_manifest.json")]
    for p in paths:
        if not os.path.isfile(p):
            raise CheckpointError(f"{workdir} is not an lmtrain run directory ({p} missing)")
    with open(paths[1]) as g:
        return run_loader.read_config_json(workdir), json.load(g)


def adopt_init_from_model(config, print_fn=print) -> None:
    """Copies the architecture keys from the init_from run into ``config.model`` (in place)."""
    if not config.init_from:
        return
    run_cfg, _ = read_run(config.init_from)
    theirs = run_cfg["model"]
    changed = {k: theirs[k] for k in ARCH_KEYS if k in theirs and config.model[k] != theirs[k]}
    if config.model.vocab_size:  # an explicit vocab size is checked, not replaced
        changed.pop("vocab_size", None)
    if changed:
        with config.unlocked(), config.model.ignore_type():
            for k, v in changed.items():
                config.model[k] = v
        print_fn(f"model architecture from init_from {config.init_from}: {changed}")


def run_tokenizer(workdir: str) -> Tokenizer:
    """The tokenizer a run trained with (``<data_dir>/tokenizer`` of its manifest)."""
    _, manifest = read_run(workdir)
    for d in (manifest.get("data_dir", ""), workdir, os.path.join(workdir, "data")):
        path = os.path.join(d, "tokenizer")
        if d and os.path.isdir(path):
            return load_tokenizer(path)
    raise CheckpointError(f"cannot find the tokenizer of run {workdir} (looked in its data_dir)")


def records_tokenizer(config) -> Tokenizer:
    """Tokenizer for a records run: ``config.data.tokenizer`` (a path) or the init_from run's."""
    spec = config.data.tokenizer
    if spec and spec != "char":
        return load_tokenizer(spec)
    if config.init_from:
        return run_tokenizer(config.init_from)
    raise ConfigError(
        "fine-tuning records need a tokenizer: set config.init_from (a pre-trained lmtrain run) or "
        "config.data.tokenizer (a tokenizer directory)"
    )


def check_same_vocabulary(workdir: str, tokenizer: Tokenizer, vocab_size: int, what: str) -> None:
    """Refuses a run whose tokenizer or vocabulary size differs from this one's."""
    run_cfg, manifest = read_run(workdir)
    theirs = manifest.get("tokenizer_fingerprint")
    if theirs and theirs != tokenizer.fingerprint():
        raise ConfigError(
            f"{what}={workdir!r} was trained with a different tokenizer (fingerprint "
            f"{theirs[:12]} vs {tokenizer.fingerprint()[:12]} here); fine-tune with the same "
            "tokenizer: leave config.data.tokenizer unset to use that run's"
        )
    their_vocab = run_cfg.get("model", {}).get("vocab_size")
    for mine, whose in (
        (vocab_size, "config.model.vocab_size"),
        (tokenizer.vocab_size, "the tokenizer"),
    ):
        if (
            their_vocab
            and mine
            and (mine > their_vocab or (whose != "the tokenizer" and mine != their_vocab))
        ):
            raise ConfigError(
                f"{what}={workdir!r} has vocab_size {their_vocab} but {whose} has {mine}; the "
                "embedding and output layers would not match. Use that run's tokenizer and "
                "config.model.vocab_size=0"
            )


def params_transform(config, model_cfg: ModelConfig) -> Callable | None:
    """Init-time transform of the model's (boxed) params into the trainable tree, or None."""
    use_lora, reward = lora_enabled(config), config.objective == "reward"
    value = config.objective == "ppo"  # PPO's value head beside the policy
    if not use_lora and not reward and not value:
        return None

    def transform(params, rng):
        out = params
        if use_lora:
            out = lora.init_adapters(
                params, config.lora.rank, config.lora.targets, jax.random.fold_in(rng, 1)
            )
        if reward:
            out = {
                **out,
                HEAD_KEY: init_reward_head(
                    model_cfg.d_model, jax.random.fold_in(rng, 2), boxed=True
                ),
            }
        if value:
            out = {
                **out,
                VALUE_KEY: init_value_head(
                    model_cfg.d_model, jax.random.fold_in(rng, 3), boxed=True
                ),
            }
        return out

    return transform


def abstract_params(model: Transformer, seq_len: int, mesh) -> tuple[dict, dict]:
    """(abstract params, NamedShardings) of the plain model tree."""
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    )
    return nn.meta.unbox(boxed), logical_shardings(boxed, mesh, LOGICAL_RULES)


def restore_run_params(workdir: str, abstract, shardings, accept_unlisted: bool = False) -> dict:
    """The latest params of an lmtrain run; a LoRA run's adapters come merged into its base.
    ``accept_unlisted``: use a step without a file listing (``fault.accept_unlisted_checkpoints``)."""
    run_config, _ = read_run(workdir)
    if run_config.get("lora", {}).get("rank", 0) > 0:
        # Its checkpoint holds adapters only: rebuild base + adapters (following its own
        # init_from chain) the way inference loads it, then lay them out for this run's mesh.
        # Merged on the host first, which suits the model sizes LoRA chains are used with here.
        return jax.device_put(run_loader.load_params(workdir)[0], shardings)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), accept_unlisted=accept_unlisted)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(
                f"{workdir}/checkpoints holds no complete checkpoint to start from"
            )
        return ckpt.restore_params(step, abstract, shardings)
    finally:
        ckpt.close()


def initial_params(setup) -> tuple[dict, dict]:
    """(params, shardings): the init_from run's latest params, else the seed's fresh init."""
    cfg = setup.config
    abstract, shardings = abstract_params(setup.model, cfg.data.seq_len, setup.mesh)
    with setup.mesh:
        if cfg.init_from:
            accept = cfg.fault.accept_unlisted_checkpoints
            return restore_run_params(cfg.init_from, abstract, shardings, accept), shardings
        return run_loader.seed_params(setup.model, cfg.data.seq_len, cfg.seed, shardings), shardings


def start_state(setup, state, initial: dict | None):
    """A fresh state's params from init_from (LoRA keeps fresh adapters over the frozen base)."""
    if initial is None or lora_enabled(setup.config) or not setup.config.init_from:
        return state
    params = dict(initial)
    if setup.config.objective == "reward":
        params[HEAD_KEY] = state.params[HEAD_KEY]
    if setup.config.objective == "ppo":
        params[VALUE_KEY] = state.params[VALUE_KEY]
    # A real copy: the step donates the state's buffers, and ``initial`` may also be passed as a
    # frozen tree (the DPO reference), which must outlive the donation.
    shardings = jax.tree.map(lambda s: s.sharding, state.params)
    params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(params)
    return state.replace(params=params)


def teacher_model(cfg) -> Transformer:
    """The ``config.distill.teacher`` run's architecture, in this run's compute dtype."""
    run_cfg, _ = read_run(cfg.distill.teacher)
    model_cfg = ModelConfig.from_config(
        {**run_cfg["model"], "dtype": cfg.model.dtype, "remat": "none"}
    )
    return Transformer(model_cfg)


def teacher(setup, tokenizer: Tokenizer):
    """(teacher model, params, shardings) of the ``config.distill.teacher`` run."""
    cfg = setup.config
    check_same_vocabulary(
        cfg.distill.teacher, tokenizer, cfg.model.vocab_size, "config.distill.teacher"
    )
    model = teacher_model(cfg)
    abstract, shardings = abstract_params(model, cfg.data.seq_len, setup.mesh)
    with setup.mesh:
        params = restore_run_params(
            cfg.distill.teacher, abstract, shardings, cfg.fault.accept_unlisted_checkpoints
        )
    return model, params, shardings


def frozen_trees(setup, tokenizer: Tokenizer, initial: dict | None, initial_shardings):
    """(frozen dict or None, its shardings, loss extras or None) for ``config.objective``."""
    cfg = setup.config
    frozen, shardings, extras = {}, {}, None
    if lora_enabled(cfg):
        frozen["base"], shardings["base"] = initial, initial_shardings
    elif (cfg.objective == "dpo" and cfg.dpo.reference == "params") or rl_reference(cfg):
        frozen["reference"], shardings["reference"] = initial, initial_shardings
    if cfg.objective == "distill":
        model, frozen["teacher"], shardings["teacher"] = teacher(setup, tokenizer)
        extras = {"teacher_model": model}
    if not frozen:
        return None, None, extras
    return frozen, shardings, extras


def needs_initial_params(config) -> bool:
    return (
        bool(config.init_from)
        or lora_enabled(config)
        or (config.objective == "dpo" and config.dpo.reference == "params")
        or rl_reference(config)
    )


def rl_reference(config) -> bool:
    """Online RL with a KL term keeps the initial params as its reference (LoRA: the base)."""
    return config.objective in RL_OBJECTIVES and config.rl.beta > 0


def full_params(config, params, frozen):
    """Plain model params for inference: LoRA folded into the frozen base, reward head dropped."""
    return run_loader.plain_params(config, params, frozen["base"] if lora_enabled(config) else None)


def add_reference_logps(setup, rows: dict, reference_params, batch_size: int) -> dict:
    """One pass of the reference model over preference rows (``config.dpo.reference='precomputed'``)."""
    fn = jax.jit(lambda p, b: pair_logps(setup.model, p, b))
    chosen, rejected = [], []
    n = finetune_data.num_rows(rows)
    with mesh_rules(setup.mesh):
        for batch in finetune_data.eval_batches(rows, batch_size=batch_size):
            c, r = fn(reference_params, batch)
            chosen.append(np.asarray(c))
            rejected.append(np.asarray(r))
    return dict(
        rows,
        reference_chosen_logps=np.concatenate(chosen)[:n].astype(np.float32),
        reference_rejected_logps=np.concatenate(rejected)[:n].astype(np.float32),
    )
