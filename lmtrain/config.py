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
from collections.abc import Sequence

import ml_collections

from lmtrain.errors import ConfigError
from lmtrain.model.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "lm"  # lm | sft | dpo | reward | distill | grpo | ppo
    c.init_from = ""  # checkpoint dir (lmtrain workdir) to start from: params only

    # The model section's keys and defaults are ModelConfig's fields (lmtrain/model/config.py).
    c.model = ml_collections.ConfigDict(ModelConfig.section_defaults())
    c.model.vocab_size = 0  # 0 = take it from the tokenizer

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # output of `lmtrain data prepare` (train/, validation/, tokenizer/)
    c.data.path = ""  # or: one raw text file, split by position (the nanoGPT char recipe)
    c.data.tokenizer = "char"  # for data.path: char | a tokenizer directory / .model file
    c.data.val_fraction = 0.1
    c.data.seq_len = 128
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.prefetch = 2  # batches prepared ahead in a background thread (0 = none)
    # Sequence-length warmup: start at this length (0 = off) and double up to seq_len over
    # curriculum_steps steps; tokens per step stay constant (rows are split, not dropped).
    c.data.curriculum_start_len = 0
    c.data.curriculum_steps = 0
    # Fine-tuning records (JSONL, read by lmtrain/data/formats.py) instead of token shards:
    c.data.train_file = ""  # SFT records (objective sft/distill) or preference pairs (dpo/reward)
    c.data.eval_file = ""  # same layout; "" = no eval
    c.data.format = "auto"  # SFT layout: auto | prompt_response | chat | alpaca | seed_tasks
    c.data.packing = True  # SFT: pack several examples per row (masks and boundaries kept)
    # Over-long records (lmtrain/data/fit.py; TRL's truncation_mode names): keep_end cuts the
    # prompt from the left and keeps the response and its EOS | keep_start cuts the end | drop
    c.data.truncation = "keep_end"
    c.data.max_lost_fraction = 0.1  # refuse a run dropping a larger share of train/eval records
    c.data.chat_markers = "auto"  # auto | special | text: role markers as special tokens or text

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.global_batch_size = 32
    c.train.microbatches = 1  # gradient accumulation inside the jitted step
    # Train steps run per jitted call (lax.scan over stacked batches): less host work per step
    # for small models; metrics stay per step. Groups never straddle a log/eval/checkpoint step.
    c.train.steps_per_dispatch = 1
    # Gradient reduction over data shards: auto (one flat all-reduce on CPU under pure data
    # parallelism, else XLA's per-parameter SPMD reduction) | flat | spmd.
    c.train.grad_sync = "auto"
    # Pretraining: compile the first train call, the eval step and the end-of-run sampler in
    # background threads while the state initialises (lmtrain/train/compile_ahead.py).
    c.train.compile_ahead = True
    # LLVM optimisation level of the train and eval steps on CPU (-1 = XLA's default, -O2).
    # -O1 skips the loop/SLP vectorisers: small models' many small fusions compile and run faster
    # without them; wider models run faster with -O2's vector loops (docs/performance.md).
    c.train.cpu_opt_level = -1
    c.train.log_every = 50
    # Metric writers (lmtrain/train/metric_writers.py): any of "jsonl", "tensorboard", "wandb".
    c.train.loggers = ("jsonl", "tensorboard")
    c.train.eval_every = 250
    c.train.eval_batches = (
        0  # cap on periodic evals (0 = whole split); the final eval is always whole
    )
    c.train.eval_batch_size = (
        0  # rows per eval batch (0 = global_batch_size); eval_batches counts these
    )
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.async_checkpoint = True
    c.train.z_loss = 0.0
    c.train.max_nonfinite_in_a_row = 10
    c.train.samples = 2  # samples printed at the end
    c.train.sample_tokens = 200
    c.train.sample_prompt = ""
    c.train.compilation_cache_dir = "~/.cache/lmtrain/xla"  # persistent XLA cache; "" = off
    c.train.peak_flops = 0.0  # per device; 0 = from the device table (lmtrain/train/flops.py)
    # Early stopping / best checkpoint (lmtrain/train/early_stop.py); patience counts evaluations.
    c.train.early_stop_patience = 0  # 0 = off
    c.train.early_stop_metric = "eval/loss"
    c.train.early_stop_min_delta = 0.0
    c.train.keep_best_metric = ""  # e.g. "eval/loss": best state kept in <workdir>/checkpoints_best
    c.train.keep_best_mode = "auto"  # auto (loss/perplexity → min, else max) | min | max

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0  # 0 = train.steps
    c.optim.min_lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.wd_exclude = ("norm", "bias")  # regexes over param paths exempt from weight decay

    c.sft = ml_collections.ConfigDict()
    c.sft.average = (
        "token"  # token: mean over response tokens | sequence: mean of per-sequence means
    )

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo
    c.dpo.label_smoothing = 0.0  # conservative DPO: assumed probability that a label is flipped
    c.dpo.reference = "params"  # params: frozen reference forward each step | precomputed: one pass
    c.dpo.nll_weight = (
        0.0  # RPO: + weight x mean per-token NLL of the chosen response (0 = plain DPO)
    )
    c.dpo.degenerate_patience = 50  # logged steps of suspicious metrics before a warning

    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # lmtrain workdir of the teacher run (same tokenizer)
    c.distill.temperature = 2.0
    c.distill.alpha = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss

    # Online RL (objectives grpo / ppo): rollouts each num_iterations steps, data.train_file =
    # prompts, data.eval_file = held-out prompts (lmtrain/train/rollout.py, losses/rl.py).
    c.rl = ml_collections.ConfigDict()
    c.rl.group_size = 4  # completions per prompt (global_batch_size = prompts x group_size)
    c.rl.num_iterations = 1  # optimizer steps on each rollout batch (> 1: clipped ratios matter)
    c.rl.max_new_tokens = 32
    c.rl.max_prompt_len = 0  # TRL max_prompt_length; 0 = seq_len + 1 - max_new_tokens
    c.rl.temperature = 1.0
    c.rl.top_k = 0
    c.rl.top_p = 1.0
    c.rl.stop = ""  # a stop string (kept, trained, as the completion's end) or "" = EOS only
    c.rl.beta = 0.04  # k3 KL to the reference; 0 = no reference pass
    c.rl.epsilon_low = 0.2
    c.rl.epsilon_high = 0.2  # > epsilon_low: DAPO's clip-higher
    c.rl.scale_rewards = True  # GRPO: divide by the group's std (False: Dr.GRPO)
    c.rl.loss_norm = "sequence"  # sequence (GRPO) | token (DAPO) | constant (Dr.GRPO)
    c.rl.importance_level = "token"  # token | sequence (GSPO)
    c.rl.rewards = ("exact_match",)  # exact_match | format | code | reward_model
    c.rl.reward_weights = ()  # one per reward; () = all 1.0
    c.rl.format_regex = ""
    c.rl.reward_model = ""  # workdir of a trained objective=reward run (the judge)
    c.rl.code_timeout_s = 5.0
    c.rl.allow_code_execution = False  # reward 'code' runs generated programs: opt in explicitly
    c.rl.eval_temperature = 0.0  # held-out completions: 0 = greedy
    c.rl.eval_max_prompts = 0  # 0 = every held-out prompt
    c.rl.log_samples = 8  # rollouts written to <workdir>/rollouts/eval_<step>.jsonl per eval
    c.rl.kl_budget = 0.0  # > 0: warn when held-out per-sequence KL to the reference exceeds it
    c.rl.ppo = ml_collections.ConfigDict()
    c.rl.ppo.gamma = 1.0
    c.rl.ppo.lam = 0.95
    c.rl.ppo.vf_coef = 0.1
    c.rl.ppo.cliprange_value = 0.2
    c.rl.ppo.whiten_advantages = True

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (full fine-tuning); > 0 = train low-rank adapters only
    c.lora.alpha = 16.0  # adapter scale = alpha / rank
    c.lora.dropout = 0.0
    c.lora.targets = ("q", "k", "v", "o")  # any of q k v o gate up down, or attn / mlp / all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one axis may be -1 = the rest
    c.mesh.num_devices = 0  # 0 = every device; N = only the first N (e.g. 1 for a one-device run)

    c.fault = (
        ml_collections.ConfigDict()
    )  # fault tolerance (lmtrain/train/preflight.py, checkpoint.py)
    c.fault.preflight = True  # check workdir, disk, data, vocab, mesh and batch before compiling
    c.fault.verify_data_hashes = (
        True  # preflight hashes data shards against their manifest (cached)
    )
    c.fault.checkpoint_hashes = True  # SHA-256 of every checkpoint file in its listing (else sizes)
    c.fault.spike_factor = (
        0.0  # > 1: loss > factor x recent median rolls back, skipping data; 0 = off
    )
    c.fault.spike_window = 50  # recent finite losses whose median a spike is measured against
    c.fault.max_rollbacks = 5  # more spikes than this stop the run (TrainingDiverged)
    c.fault.spike_warn_factor = 3.0  # warn (only) on loss > factor x recent median; 0 = off
    c.fault.accept_unlisted_checkpoints = False  # resume from a step lacking lmtrain_files.json
    c.fault.allow_restart = False  # start over from step 0 in a workdir with progress on record

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto | yes | no
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


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


def _unknown_key_error(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}){hint}")


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


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Impossible combinations fail here, before any compile, naming the key and the fix."""
    from lmtrain.model.sharding import resolve_mesh_shape
    from lmtrain.model.transformer import REMAT_POLICIES
    from lmtrain.train.objectives import OBJECTIVES

    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(
        cfg.objective in OBJECTIVES,
        f"config.objective={cfg.objective!r}: choose one of {sorted(OBJECTIVES)}",
    )
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        need(m[key] > 0, f"config.model.{key}={m[key]} must be positive")
    need(m.vocab_size >= 0, "config.model.vocab_size must be >= 0 (0 = from the tokenizer)")
    need(
        m.n_kv_heads <= m.n_heads,
        f"config.model.n_kv_heads={m.n_kv_heads} must be <= model.n_heads={m.n_heads}",
    )
    need(
        m.n_heads % m.n_kv_heads == 0,
        f"config.model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}",
    )
    head_dim = m.head_dim or m.d_model // m.n_heads
    need(
        m.head_dim > 0 or m.d_model % m.n_heads == 0,
        f"config.model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} (or set model.head_dim)",
    )
    need(
        head_dim % 2 == 0,
        f"head dim {head_dim} must be even for rotary embeddings (config.model.head_dim)",
    )
    for key in ("dtype", "param_dtype", "matmul_dtype"):
        allowed = ("float32", "bfloat16", "float16") + (("",) if key == "matmul_dtype" else ())
        need(
            m[key] in allowed,
            f"config.model.{key}={m[key]!r}: use float32, bfloat16 or float16"
            + (' (or "" for model.dtype)' if key == "matmul_dtype" else ""),
        )
    need(
        m.remat in REMAT_POLICIES, f"config.model.remat={m.remat!r}: choose one of {REMAT_POLICIES}"
    )
    need(
        m.mlp_activation in ("silu", "gelu_tanh"),
        f"config.model.mlp_activation={m.mlp_activation!r}: silu or gelu_tanh",
    )
    from lmtrain.model.attention_kernels import check_available

    check_available(m.attention, dtype=m.dtype)  # ConfigError naming the backend and the fix
    need(d.seq_len > 0, "config.data.seq_len must be positive")
    need(
        d.seq_len <= m.max_seq_len,
        f"config.data.seq_len={d.seq_len} exceeds config.model.max_seq_len={m.max_seq_len}",
    )
    from lmtrain.data.pipeline import check_curriculum

    check_curriculum(d.curriculum_start_len, d.curriculum_steps, d.seq_len)
    need(
        bool(d.dir) != bool(d.path) or (d.train_file and not d.dir and not d.path),
        "set exactly one of config.data.dir (prepared shards) or config.data.path (one text file), or config.data.train_file (fine-tuning records)",
    )
    _validate_finetune(cfg, need)
    need(0.0 < d.val_fraction < 1.0, f"config.data.val_fraction={d.val_fraction} must be in (0, 1)")
    need(t.steps > 0, "config.train.steps must be positive")
    need(t.global_batch_size > 0, "config.train.global_batch_size must be positive")
    need(t.microbatches > 0, "config.train.microbatches must be positive")
    need(
        t.steps_per_dispatch > 0,
        f"config.train.steps_per_dispatch={t.steps_per_dispatch} must be positive (1 = one step per call)",
    )
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        need(t[key] > 0, f"config.train.{key}={t[key]} must be positive")
    need(
        o.schedule in ("cosine", "linear", "constant"),
        f"config.optim.schedule={o.schedule!r}: cosine, linear or constant",
    )
    need(o.lr > 0, "config.optim.lr must be positive")
    need(
        o.warmup_steps >= 0,  # longer than the run: clipped by optim.effective_warmup
        f"config.optim.warmup_steps={o.warmup_steps} must be >= 0",
    )
    need(o.clip_norm >= 0, "config.optim.clip_norm must be >= 0 (0 = no clipping)")
    need(
        0 <= cfg.mesh.num_devices <= num_devices,
        f"config.mesh.num_devices={cfg.mesh.num_devices} must be between 0 (all) and the "
        f"{num_devices} available devices",
    )
    mesh = resolve_mesh_shape(cfg.mesh.shape, cfg.mesh.num_devices or num_devices)
    shards = mesh[0] * mesh[1]
    need(
        t.global_batch_size % (shards * t.microbatches) == 0,
        f"config.train.global_batch_size={t.global_batch_size} must be divisible by data shards "
        f"(mesh data x fsdp = {shards}) x config.train.microbatches={t.microbatches}",
    )
    need(
        t.eval_batch_size >= 0 and (t.eval_batch_size or t.global_batch_size) % shards == 0,
        f"config.train.eval_batch_size={t.eval_batch_size} must be 0 (= global_batch_size) or a "
        f"positive multiple of the data shards (mesh data x fsdp = {shards})",
    )
    need(
        t.get("cpu_opt_level", -1) in (-1, 0, 1, 2, 3),
        f"config.train.cpu_opt_level={t.get('cpu_opt_level')!r}: -1 (XLA's default), 0, 1, 2 or 3",
    )
    grad_sync = t.get("grad_sync", "auto")
    need(
        grad_sync in ("auto", "flat", "spmd"),
        f"config.train.grad_sync={grad_sync!r}: auto, flat or spmd",
    )
    need(
        grad_sync != "flat" or (mesh[1] == 1 and mesh[2] == 1 and m.attention == "xla"),
        f"config.train.grad_sync='flat' needs pure data parallelism with the xla attention "
        f"(mesh fsdp = tensor = 1, model.attention='xla'; here mesh {mesh}, attention "
        f"{m.attention!r}); use 'auto' or 'spmd'",
    )
    need(
        cfg.distributed.initialize in ("auto", "yes", "no"),
        "config.distributed.initialize: auto, yes or no",
    )
    f = cfg.fault
    need(
        f.spike_factor == 0 or f.spike_factor > 1,
        f"config.fault.spike_factor={f.spike_factor}: 0 (off) or > 1, e.g. 3",
    )
    need(
        f.spike_warn_factor == 0 or f.spike_warn_factor > 1,
        f"config.fault.spike_warn_factor={f.spike_warn_factor}: 0 (off) or > 1, e.g. 3",
    )
    need(
        f.spike_window > 0 and f.max_rollbacks >= 0,
        "config.fault.spike_window must be > 0 and fault.max_rollbacks >= 0",
    )


def _validate_finetune(cfg: ml_collections.ConfigDict, need) -> None:
    """Checks of the fine-tuning keys (objective, data.train_file, sft, dpo, distill, lora)."""
    from lmtrain.model.lora import resolve_targets

    d, obj = cfg.data, cfg.objective
    if obj in ("sft", "dpo", "reward", "grpo", "ppo"):
        need(
            bool(d.train_file),
            f"config.objective={obj!r} needs config.data.train_file (JSONL records)",
        )
    need(
        obj != "lm" or not d.train_file,
        "config.data.train_file is for fine-tuning; use objective sft",
    )
    need(
        d.format in ("auto", "prompt_response", "chat", "alpaca", "seed_tasks"),
        f"config.data.format={d.format!r}: auto, prompt_response, chat, alpaca or seed_tasks",
    )
    need(
        d.truncation in ("keep_end", "keep_start", "drop", "left_prompt", "right"),
        f"config.data.truncation={d.truncation!r}: keep_end, keep_start or drop",
    )
    need(
        0.0 <= d.max_lost_fraction <= 1.0,
        f"config.data.max_lost_fraction={d.max_lost_fraction} must be in [0, 1]",
    )
    need(
        d.chat_markers in ("auto", "special", "text"),
        f"config.data.chat_markers={d.chat_markers!r}: auto, special or text",
    )
    need(
        cfg.sft.average in ("token", "sequence"),
        f"config.sft.average={cfg.sft.average!r}: token or sequence",
    )
    p = cfg.dpo
    need(p.beta > 0, f"config.dpo.beta={p.beta} must be positive")
    need(p.nll_weight >= 0, f"config.dpo.nll_weight={p.nll_weight} must be >= 0 (0 turns it off)")
    need(p.loss in ("sigmoid", "ipo"), f"config.dpo.loss={p.loss!r}: sigmoid or ipo")
    need(
        0.0 <= p.label_smoothing < 0.5,
        f"config.dpo.label_smoothing={p.label_smoothing} must be in [0, 0.5)",
    )
    need(
        p.loss == "sigmoid" or p.label_smoothing == 0.0,
        "config.dpo.label_smoothing applies to loss=sigmoid only",
    )
    need(
        p.reference in ("params", "precomputed"),
        f"config.dpo.reference={p.reference!r}: params or precomputed",
    )
    t = cfg.distill
    need(
        obj != "distill" or bool(t.teacher),
        "config.objective='distill' needs config.distill.teacher (a workdir)",
    )
    need(t.temperature > 0, f"config.distill.temperature={t.temperature} must be positive")
    need(0.0 <= t.alpha <= 1.0, f"config.distill.alpha={t.alpha} must be in [0, 1]")
    from lmtrain.rl_config import validate_rl

    validate_rl(cfg, need)
    lo = cfg.lora
    need(lo.rank >= 0, f"config.lora.rank={lo.rank} must be >= 0 (0 = off)")
    need(lo.alpha > 0, f"config.lora.alpha={lo.alpha} must be positive")
    need(0.0 <= lo.dropout < 1.0, f"config.lora.dropout={lo.dropout} must be in [0, 1)")
    if lo.rank:
        resolve_targets(lo.targets)  # raises ConfigError naming the bad target
