"""What a run is built from its config: mesh, model, tokenizer, data, optimizer, state layout.

``build(config, workdir)`` is shared by train, eval and generate; ``build_layout`` is its
device part, also used by ``lmtrain compile`` over a TPU topology's abstract devices.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.data import finetune_data, pipeline
from lmtrain.data.text_file import prepare_text_file
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.distributed import maybe_initialize
from lmtrain.errors import ConfigError, DataError
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import finetune, rollout
from lmtrain.train.config_check import validate
from lmtrain.train.optim import make_optimizer
from lmtrain.train.state import state_shardings
from lmtrain.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class Setup:
    """Everything built from a config, shared by train, eval and generate."""

    config: object
    mesh: object
    model: Transformer
    model_cfg: ModelConfig
    tokenizer: object
    data_dir: str
    tx: object
    schedule: object
    abstract_state: object
    shardings: object
    batch_sharding: NamedSharding
    params_transform: object = None  # LoRA / reward head (lmtrain/train/finetune.py)
    eval_rows: dict | None = None  # fine-tuning records runs: the eval file's rows
    eval_fit: object = None  # and its FitStats (what fitting seq_len cut and dropped)


def resolve_data(config, workdir: str) -> str:
    if config.data.path:
        return_dir = os.path.join(workdir, "data")
        if jax.process_index() == 0:
            prepare_text_file(
                config.data.path,
                return_dir,
                tokenizer=config.data.tokenizer,
                val_fraction=config.data.val_fraction,
            )
        if jax.process_count() > 1:  # the other processes read what process 0 just wrote
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lmtrain: text file prepared")
        return return_dir
    if not os.path.isdir(config.data.dir):
        raise DataError(
            f"config.data.dir={config.data.dir!r} does not exist; run `lmtrain data prepare` first "
            "or point config.data.dir at its output"
        )
    return config.data.dir


def _tokenizer_and_data(config, workdir: str):
    """(tokenizer, data_dir); sets ``model.vocab_size`` 0 to the tokenizer's."""
    if finetune.uses_records(config):  # fine-tuning records: the run keeps its tokenizer itself
        tokenizer, data_dir = finetune.records_tokenizer(config), workdir
        if jax.process_index() == 0:
            tokenizer.save(os.path.join(workdir, "tokenizer"))
    else:
        data_dir = resolve_data(config, workdir)
        tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    if config.init_from:
        finetune.check_same_vocabulary(
            config.init_from, tokenizer, config.model.vocab_size, "config.init_from"
        )
    if config.model.vocab_size == 0:
        with config.unlocked():
            config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ({data_dir}/tokenizer); set it to 0 to follow the tokenizer"
        )
    return tokenizer, data_dir


def build(config, workdir: str) -> Setup:
    maybe_initialize(config.distributed)
    finetune.adopt_init_from_model(config)
    validate(config, jax.device_count())
    tokenizer, data_dir = _tokenizer_and_data(config, workdir)
    devices = jax.devices()[: config.mesh.num_devices or None]
    mesh, model_cfg, model, tx, schedule, transform, abstract, shardings, batch_sharding = (
        build_layout(config, devices)
    )
    eval_rows = eval_fit = None
    if finetune.uses_records(config) and config.data.eval_file and not rollout.is_rl(config):
        eval_rows, eval_fit = finetune_data.rows_and_fit(config, tokenizer, config.data.eval_file)
    return Setup(
        config,
        mesh,
        model,
        model_cfg,
        tokenizer,
        data_dir,
        tx,
        schedule,
        abstract,
        shardings,
        batch_sharding,
        transform,
        eval_rows,
        eval_fit,
    )


def build_layout(config, devices) -> tuple:
    """Mesh, model, optimizer and the state's abstract shapes and shardings over ``devices``
    (real ones, or a TPU topology's abstract devices for ``lmtrain compile``): (mesh, model_cfg,
    model, tx, schedule, params_transform, abstract_state, state_shardings, batch_sharding)."""
    mesh = make_mesh(config.mesh.shape, devices)
    model_cfg = ModelConfig.from_config(config.model)
    model = Transformer(model_cfg)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    transform = finetune.params_transform(config, model_cfg)
    abstract, shardings = state_shardings(
        model, tx, config.data.seq_len, config.seed, mesh, transform
    )
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return mesh, model_cfg, model, tx, schedule, transform, abstract, shardings, batch_sharding


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Host batch → global arrays sharded over (data, fsdp); each process passes its own rows."""
    if jax.process_count() == 1:  # one transfer call for the whole dict (cheaper per step)
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def token_dataset(cfg, setup: Setup):
    """The train split's token windows, batched per process (Grain, random access)."""
    return pipeline.train_dataset(
        os.path.join(setup.data_dir, cfg.data.train_split),
        seq_len=cfg.data.seq_len,
        batch_size=cfg.train.global_batch_size // jax.process_count(),
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def step_functions(setup: Setup, frozen_shardings, extras):
    """The run's jitted (train_step, eval_step)."""
    cfg, mesh = setup.config, setup.mesh
    train_step = make_train_step(
        setup.model,
        setup.schedule,
        cfg,
        mesh,
        setup.shardings,
        setup.batch_sharding,
        frozen_shardings,
        extras,
    )
    eval_step = make_eval_step(
        setup.model,
        cfg,
        mesh,
        setup.shardings.params,
        setup.batch_sharding,
        frozen_shardings,
        extras,
    )
    return train_step, eval_step
