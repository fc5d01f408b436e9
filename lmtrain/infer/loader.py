"""A trained run ready to generate and evaluate: its setup (config, mesh, model, tokenizer) and
its plain params on that mesh. The config and params come from ``lmtrain.train.run_loader``."""

from __future__ import annotations

import dataclasses
import os

import jax

from lmtrain.config import apply_overrides
from lmtrain.train import finetune, run_loader
from lmtrain.train.loop import build


@dataclasses.dataclass
class LoadedRun:
    setup: object  # lmtrain.train.loop.Setup: config, mesh, model, tokenizer, data_dir, ...
    params: dict  # plain model params (LoRA merged, reward head dropped) on setup.mesh
    step: int
    checkpoint_dir: str


def _detach_from_init_from(cfg, workdir: str) -> None:
    """A full fine-tuning run's checkpoint holds all its params and its config.json the adopted
    architecture, so loading it must not need the ``init_from`` run (moved, deleted, retrained):
    drop that link and read the tokenizer the run saved in its own workdir."""
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


def load_run(workdir: str, step: str | int | None = None, overrides=()) -> LoadedRun:
    """Restore the params of ``workdir`` at ``step``: None/"latest", "best" or a step number.

    The run's own ``config.json`` rebuilds the model and mesh, and the params are placed with
    the shardings training used; ``overrides`` (``"mesh.shape=(1,1,8)"``) can change the mesh.
    Fine-tuning runs give plain model params too: LoRA adapters are merged into their base and
    a reward model's head is dropped (``run_loader.plain_params``).
    """
    cfg = run_loader.read_config(workdir)
    apply_overrides(cfg, list(overrides))
    _detach_from_init_from(cfg, workdir)
    setup = build(cfg, workdir)
    params, chosen, ckpt_dir = run_loader.load_params(workdir, step, cfg)
    _, shardings = finetune.abstract_params(setup.model, cfg.data.seq_len, setup.mesh)
    return LoadedRun(setup, jax.device_put(params, shardings), chosen, ckpt_dir)
