"""Config files, dotted command-line overrides and the checks that run before any compile.

A config file is a Python module with ``get_config() -> ml_collections.ConfigDict`` that starts
from ``base_config()``. Every key a run can use exists in ``base_config()``, so a typo is an error
that names the key (with the closest valid names) instead of a silently ignored setting.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence

import ml_collections

from lmtrain.errors import ConfigError
from lmtrain.model.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
    """Every key a run can use, with its default (one small function a section)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "lm"  # lm | sft | dpo | reward | distill | grpo | ppo
    c.init_from = ""  # checkpoint dir (lmtrain workdir) to start from: params only
    # The model section's keys and defaults are ModelConfig's fields (lmtrain/model/config.py).
    c.model = ml_collections.ConfigDict(ModelConfig.section_defaults())
    c.model.vocab_size = 0  # 0 = take it from the tokenizer
    c.data = _data_section()
    c.train = _train_section()
    c.optim = _optim_section()
    c.sft, c.dpo, c.distill = _objective_sections()
    c.rl = _rl_section()
    c.lora = _lora_section()
    c.mesh = _mesh_section()
    c.fault = _fault_section()
    c.distributed = _distributed_section()
    return c


def _data_section() -> ml_collections.ConfigDict:
    """``config.data``: token shards or one text file, or fine-tuning records."""
    s = ml_collections.ConfigDict()
    s.dir = ""  # output of `lmtrain data prepare` (train/, validation/, tokenizer/)
    s.path = ""  # or: one raw text file, split by position (the nanoGPT char recipe)
    s.tokenizer = "char"  # for data.path: char | a tokenizer directory / .model file
    s.val_fraction = 0.1
    s.seq_len = 128
    s.train_split = "train"
    s.eval_split = "validation"
    s.prefetch = 2  # batches prepared ahead in a background thread (0 = none)
    # Sequence-length warmup: start at this length (0 = off) and double up to seq_len over
    # curriculum_steps steps; tokens per step stay constant (rows are split, not dropped).
    s.curriculum_start_len = 0
    s.curriculum_steps = 0
    # Fine-tuning records (JSONL, read by lmtrain/data/formats.py) instead of token shards:
    s.train_file = ""  # SFT records (objective sft/distill) or preference pairs (dpo/reward)
    s.eval_file = ""  # same layout; "" = no eval
    s.format = "auto"  # SFT layout: auto | prompt_response | chat | alpaca | seed_tasks
    s.packing = True  # SFT: pack several examples per row (masks and boundaries kept)
    # Over-long records (lmtrain/data/fit.py; TRL's truncation_mode names): keep_end cuts the
    # prompt from the left and keeps the response and its EOS | keep_start cuts the end | drop
    s.truncation = "keep_end"
    s.max_lost_fraction = 0.1  # refuse a run dropping a larger share of train/eval records
    s.chat_markers = "auto"  # auto | special | text: role markers as special tokens or text
    return s


def _train_section() -> ml_collections.ConfigDict:
    """``config.train``: steps, batches, logging, evaluation, checkpoints, samples."""
    s = ml_collections.ConfigDict()
    s.steps = 1000
    s.global_batch_size = 32
    s.microbatches = 1  # gradient accumulation inside the jitted step
    # Train steps run per jitted call (lax.scan over stacked batches): less host work per step
    # for small models; metrics stay per step. Groups never straddle a log/eval/checkpoint step.
    s.steps_per_dispatch = 1
    # Gradient reduction over data shards: auto (one flat all-reduce on CPU under pure data
    # parallelism, else XLA's per-parameter SPMD reduction) | flat | spmd.
    s.grad_sync = "auto"
    # Pretraining: compile the first train call, the eval step and the end-of-run sampler in
    # background threads while the state initialises (lmtrain/train/compile_ahead.py).
    s.compile_ahead = True
    # LLVM optimisation level of the train and eval steps on CPU (-1 = XLA's default, -O2).
    # -O1 skips the loop/SLP vectorisers: small models' many small fusions compile and run faster
    # without them; wider models run faster with -O2's vector loops (docs/performance.md).
    s.cpu_opt_level = -1
    s.log_every = 50
    # Metric writers (lmtrain/train/metric_writers.py): any of "jsonl", "tensorboard", "wandb".
    s.loggers = ("jsonl", "tensorboard")
    s.eval_every = 250
    s.eval_batches = 0  # cap on periodic evals (0 = whole split); the final eval is always whole
    s.eval_batch_size = 0  # rows per eval batch (0 = global_batch_size); eval_batches counts these
    s.checkpoint_every = 500
    s.keep_checkpoints = 2
    s.async_checkpoint = True
    s.z_loss = 0.0
    s.max_nonfinite_in_a_row = 10
    s.samples = 2  # samples printed at the end
    s.sample_tokens = 200
    s.sample_prompt = ""
    s.compilation_cache_dir = "~/.cache/lmtrain/xla"  # persistent XLA cache; "" = off
    s.peak_flops = 0.0  # per device; 0 = from the device table (lmtrain/train/flops.py)
    # Early stopping / best checkpoint (lmtrain/train/early_stop.py); patience counts evaluations.
    s.early_stop_patience = 0  # 0 = off
    s.early_stop_metric = "eval/loss"
    s.early_stop_min_delta = 0.0
    s.keep_best_metric = ""  # e.g. "eval/loss": best state kept in <workdir>/checkpoints_best
    s.keep_best_mode = "auto"  # auto (loss/perplexity → min, else max) | min | max
    return s


def _optim_section() -> ml_collections.ConfigDict:
    """``config.optim``: AdamW and its learning-rate schedule (lmtrain/train/optim.py)."""
    s = ml_collections.ConfigDict()
    s.lr = 1e-3
    s.schedule = "cosine"  # cosine | linear | constant
    s.warmup_steps = 100
    s.decay_steps = 0  # 0 = train.steps
    s.min_lr = 1e-4
    s.b1 = 0.9
    s.b2 = 0.95
    s.eps = 1e-8
    s.weight_decay = 0.1
    s.clip_norm = 1.0
    s.wd_exclude = ("norm", "bias")  # regexes over param paths exempt from weight decay
    return s


def _objective_sections() -> tuple[ml_collections.ConfigDict, ...]:
    """``config.sft``, ``config.dpo`` and ``config.distill``: the fine-tuning objectives."""
    sft = ml_collections.ConfigDict()
    sft.average = "token"  # token: mean over response tokens | sequence: mean of per-sequence means
    dpo = ml_collections.ConfigDict()
    dpo.beta = 0.1
    dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo
    dpo.label_smoothing = 0.0  # conservative DPO: assumed probability that a label is flipped
    dpo.reference = "params"  # params: frozen reference forward each step | precomputed: one pass
    dpo.nll_weight = (
        0.0  # RPO: + weight x mean per-token NLL of the chosen response (0 = plain DPO)
    )
    dpo.degenerate_patience = 50  # logged steps of suspicious metrics before a warning
    distill = ml_collections.ConfigDict()
    distill.teacher = ""  # lmtrain workdir of the teacher run (same tokenizer)
    distill.temperature = 2.0
    distill.alpha = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss
    return sft, dpo, distill


def _rl_section() -> ml_collections.ConfigDict:
    """``config.rl``: online RL (objectives grpo / ppo; checked by lmtrain/rl_config.py)."""
    s = ml_collections.ConfigDict()
    # Online RL (objectives grpo / ppo): rollouts each num_iterations steps, data.train_file =
    # prompts, data.eval_file = held-out prompts (lmtrain/train/rollout.py, losses/rl.py).
    s.group_size = 4  # completions per prompt (global_batch_size = prompts x group_size)
    s.num_iterations = 1  # optimizer steps on each rollout batch (> 1: clipped ratios matter)
    s.max_new_tokens = 32
    s.max_prompt_len = 0  # TRL max_prompt_length; 0 = seq_len + 1 - max_new_tokens
    s.temperature = 1.0
    s.top_k = 0
    s.top_p = 1.0
    s.stop = ""  # a stop string (kept, trained, as the completion's end) or "" = EOS only
    s.beta = 0.04  # k3 KL to the reference; 0 = no reference pass
    s.epsilon_low = 0.2
    s.epsilon_high = 0.2  # > epsilon_low: DAPO's clip-higher
    s.scale_rewards = True  # GRPO: divide by the group's std (False: Dr.GRPO)
    s.loss_norm = "sequence"  # sequence (GRPO) | token (DAPO) | constant (Dr.GRPO)
    s.importance_level = "token"  # token | sequence (GSPO)
    s.rewards = ("exact_match",)  # exact_match | format | code | reward_model
    s.reward_weights = ()  # one per reward; () = all 1.0
    s.format_regex = ""
    s.reward_model = ""  # workdir of a trained objective=reward run (the judge)
    s.code_timeout_s = 5.0
    s.allow_code_execution = False  # reward 'code' runs generated programs: opt in explicitly
    s.eval_temperature = 0.0  # held-out completions: 0 = greedy
    s.eval_max_prompts = 0  # 0 = every held-out prompt
    s.log_samples = 8  # rollouts written to <workdir>/rollouts/eval_<step>.jsonl per eval
    s.kl_budget = 0.0  # > 0: warn when held-out per-sequence KL to the reference exceeds it
    s.ppo = ml_collections.ConfigDict()
    s.ppo.gamma = 1.0
    s.ppo.lam = 0.95
    s.ppo.vf_coef = 0.1
    s.ppo.cliprange_value = 0.2
    s.ppo.whiten_advantages = True
    return s


def _lora_section() -> ml_collections.ConfigDict:
    """``config.lora``: low-rank adapters (lmtrain/model/lora.py)."""
    s = ml_collections.ConfigDict()
    s.rank = 0  # 0 = off (full fine-tuning); > 0 = train low-rank adapters only
    s.alpha = 16.0  # adapter scale = alpha / rank
    s.dropout = 0.0
    s.targets = ("q", "k", "v", "o")  # any of q k v o gate up down, or attn / mlp / all
    return s


def _mesh_section() -> ml_collections.ConfigDict:
    """``config.mesh``: the device mesh (lmtrain/model/sharding.py)."""
    s = ml_collections.ConfigDict()
    s.shape = (-1, 1, 1)  # (data, fsdp, tensor); one axis may be -1 = the rest
    s.num_devices = 0  # 0 = every device; N = only the first N (e.g. 1 for a one-device run)
    return s


def _fault_section() -> ml_collections.ConfigDict:
    """``config.fault``: fault tolerance (lmtrain/train/preflight.py, checkpoint.py)."""
    s = ml_collections.ConfigDict()
    s.preflight = True  # check workdir, disk, data, vocab, mesh and batch before compiling
    s.verify_data_hashes = True  # preflight hashes data shards against their manifest (cached)
    s.checkpoint_hashes = True  # SHA-256 of every checkpoint file in its listing (else sizes)
    s.spike_factor = 0.0  # > 1: loss > factor x recent median rolls back, skipping data; 0 = off
    s.spike_window = 50  # recent finite losses whose median a spike is measured against
    s.max_rollbacks = 5  # more spikes than this stop the run (TrainingDiverged)
    s.spike_warn_factor = 3.0  # warn (only) on loss > factor x recent median; 0 = off
    s.accept_unlisted_checkpoints = False  # resume from a step lacking lmtrain_files.json
    s.allow_restart = False  # start over from step 0 in a workdir with progress on record
    return s


def _distributed_section() -> ml_collections.ConfigDict:
    """``config.distributed``: multi-process start-up (lmtrain/distributed.py)."""
    s = ml_collections.ConfigDict()
    s.initialize = "auto"  # auto | yes | no
    s.coordinator_address = ""
    s.num_processes = 0
    s.process_id = -1
    return s


def load_config_file(path: str) -> ml_collections.ConfigDict:
    if not os.path.exists(path):
        raise ConfigError(
            f"config file {path!r} not found; pass a path such as configs/quickstart.py"
        )
    spec = importlib.util.spec_from_file_location(f"_lmtrain_cfg_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} must define get_config()")
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's file, named with its cause
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat_keys(v, name + "."))
        else:
            out[name] = v
    return out


def did_you_mean(key: str, known: Iterable[str], n: int = 3, otherwise: str = "") -> str:
    """``"; did you mean a, b?"`` naming the known keys closest to an unknown ``key`` (up to
    ``n``), or ``otherwise`` when none is close: the hint of every unknown-key error."""
    close = difflib.get_close_matches(key, list(known), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else otherwise


def _unknown_key_error(key: str, known: Sequence[str], where: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r} ({where}){did_you_mean(key, known)}")


def check_against_schema(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    """Every key must exist in the schema, with a value of a compatible type."""
    known = _flat_keys(schema)
    for key, value in _flat_keys(cfg).items():
        if key not in known:
            raise _unknown_key_error(key, list(known), "not in lmtrain.config.base_config()")
        _check_type(key, value, known[key])


def _check_type(key: str, value, default) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"config.{key}={value!r}: expected a bool like {default!r}")
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise ConfigError(f"config.{key}={value!r}: expected a number like {default!r}")
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"config.{key}={value!r}: expected an integer like {default!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"config.{key}={value!r}: expected a string like {default!r}")
    if isinstance(default, (tuple, list)) and not isinstance(value, (tuple, list)):
        raise ConfigError(f"config.{key}={value!r}: expected a tuple like {default!r}")


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not a bool")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            v = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{text!r} is not an integer") from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{text!r} is not an integer")
        return v
    if isinstance(current, float):
        v = float(text)
        return v
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            v = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{text!r} is not a tuple such as (2, 2, 2)") from None
        if not isinstance(v, (tuple, list)):
            v = (v,)
        return tuple(v)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``a.b=value`` (a leading ``config.`` or ``--config.`` is accepted)."""
    known = _flat_keys(cfg)
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --config.train.steps=200")
        key, text = item.split("=", 1)
        if key not in known:
            raise _unknown_key_error(key, list(known), "from the command line")
        try:
            value = _parse_value(text, known[key])
        # literal_eval also raises TypeError ({[]: 1}), MemoryError/RecursionError (deep nesting)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise ConfigError(
                f"config.{key}: cannot read {text!r} as {type(known[key]).__name__} ({e})"
            ) from None
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
        known[key] = value


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a training config file, applies overrides and checks it against the schema."""
    cfg = load_config_file(path)
    check_against_schema(cfg, base_config())
    apply_overrides(cfg, overrides)
    check_against_schema(cfg, base_config())
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
