"""Load a trained run (its config, tokenizer, model and sharded params) for generation and eval."""

from __future__ import annotations

import dataclasses
import json
import os

from lmtrain.errors import CheckpointError

BEST_DIR = "checkpoints_best"  # written by lmtrain.train.early_stop.BestCheckpointKeeper


@dataclasses.dataclass
class LoadedRun:
    setup: object  # lmtrain.train.loop.Setup: config, mesh, model, tokenizer, data_dir, ...
    params: dict  # plain model params (LoRA merged, reward head dropped) on setup.mesh
    step: int
    checkpoint_dir: str


def _merge(base, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and hasattr(base.get(key), "items"):
            _merge(base[key], value)
        else:
            if isinstance(base.get(key), tuple) and isinstance(value, list):
                value = tuple(value)
            base[key] = value


def _detach_from_init_from(cfg, workdir: str) -> None:
    """A full fine-tuning run's checkpoint holds all its params and its config.json the adopted
    architecture, so loading it must not need the ``init_from`` run (moved, deleted, retrained):
    drop that link and read the tokenizer the run saved in its own workdir."""
    from lmtrain.train import finetune

    if not cfg.init_from or finetune.lora_enabled(cfg):
        return  # a LoRA checkpoint holds adapters only: the base comes from init_from
    own_tokenizer = os.path.join(workdir, "tokenizer")
    if finetune.uses_records(cfg) and not os.path.isdir(own_tokenizer):
        return  # an older run without its own tokenizer copy: keep reading init_from's
    with cfg.unlocked():
        cfg.init_from = ""
        if finetune.uses_records(cfg):
            cfg.data.tokenizer = own_tokenizer
        cfg.data.eval_file = ""  # not needed for inference; may have moved


def inference_params(setup, params: dict) -> dict:
    """Plain model params of a restored train state: LoRA adapters folded into their base
    (``config.init_from``'s latest checkpoint, else the seed's init, as training used), the
    reward head dropped."""
    from lmtrain.train import finetune

    frozen = None
    if finetune.lora_enabled(setup.config):
        base, _ = finetune.initial_params(setup)
        frozen = {"base": base}
    with setup.mesh:
        return finetune.full_params(setup.config, params, frozen)


def load_run(workdir: str, step: str | int | None = None, overrides=()) -> LoadedRun:
    """Restore the params of ``workdir`` at ``step``: None/"latest", "best" or a step number.

    The run's own ``config.json`` rebuilds the model and mesh, so params come back with the
    shardings training used; ``overrides`` (``"mesh.shape=(1,1,8)"``) can change the mesh.
    Fine-tuning runs give plain model params too: LoRA adapters are merged into their base and
    a reward model's head is dropped (``inference_params``).
    """
    import ml_collections

    from lmtrain.config import apply_overrides, base_config, check_against_schema
    from lmtrain.train.checkpoint import Checkpointer
    from lmtrain.train.loop import build

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{cfg_path} not found: --checkpoint must be a training workdir (lmtrain train "
            "--workdir ...)"
        )
    with open(cfg_path) as f:
        saved = json.load(f)
    check_against_schema(ml_collections.ConfigDict(saved), base_config())
    # Start from today's schema so keys added since the run was trained get their defaults.
    cfg = base_config()
    _merge(cfg, saved)
    apply_overrides(cfg, list(overrides))
    _detach_from_init_from(cfg, workdir)
    setup = build(cfg, workdir)
    sub = BEST_DIR if step == "best" else "checkpoints"
    ckpt_dir = os.path.join(workdir, sub)
    if not os.path.isdir(ckpt_dir):
        hint = " (set train.keep_best_metric when training)" if step == "best" else "; train first"
        raise CheckpointError(f"no checkpoint directory {ckpt_dir}{hint}")
    accept = bool(cfg.fault.get("accept_unlisted_checkpoints", False))
    ckpt = Checkpointer(ckpt_dir, async_save=False, accept_unlisted=accept)
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
        params = ckpt.restore_params(chosen, setup.abstract_state.params, setup.shardings.params)
    finally:
        ckpt.close()
    params = inference_params(setup, params)
    return LoadedRun(setup, params, int(chosen), ckpt_dir)
