"""The whole run config checked before any compile: each section by its owner.

``lmtrain.config`` checks keys and types against ``base_config``; the values are checked here,
in the train layer that can see every owner: the model section by ``lmtrain.model.config`` (and
the attention backend by ``attention_kernels``), data by ``lmtrain.data.checks``, the mesh by
``lmtrain.model.sharding``, rl by ``lmtrain.rl_config``; the objectives, LoRA, train, optim
and fault sections, and the checks across sections, by the trainer (below).
"""

from __future__ import annotations

from lmtrain.data.checks import check_data_section
from lmtrain.errors import require
from lmtrain.model.attention_kernels import check_available
from lmtrain.model.config import check_model_section
from lmtrain.model.lora import resolve_targets
from lmtrain.model.sharding import check_mesh_section
from lmtrain.rl_config import validate_rl
from lmtrain.train.objectives import OBJECTIVES


def validate(cfg, num_devices: int) -> None:
    """Impossible combinations fail here, before any compile, naming the key and the fix."""
    require(
        cfg.objective in OBJECTIVES,
        f"config.objective={cfg.objective!r}: choose one of {sorted(OBJECTIVES)}",
    )
    check_model_section(cfg.model)
    check_available(cfg.model.attention, dtype=cfg.model.dtype)  # names the backend and the fix
    check_data_section(cfg.data, cfg.model.max_seq_len)
    check_objective_sections(cfg)
    validate_rl(cfg, require)
    check_lora_section(cfg.lora)
    check_train_section(cfg.train)
    check_optim_section(cfg.optim)
    mesh = check_mesh_section(cfg.mesh, num_devices)
    check_batch_over_mesh(cfg, mesh)
    require(
        cfg.distributed.initialize in ("auto", "yes", "no"),
        "config.distributed.initialize: auto, yes or no",
    )
    check_fault_section(cfg.fault)


def check_objective_sections(cfg) -> None:
    """The objective's data needs and the sft, dpo and distill sections."""
    d, obj = cfg.data, cfg.objective
    if obj in ("sft", "dpo", "reward", "grpo", "ppo"):
        require(
            bool(d.train_file),
            f"config.objective={obj!r} needs config.data.train_file (JSONL records)",
        )
    require(
        obj != "lm" or not d.train_file,
        "config.data.train_file is for fine-tuning; use objective sft",
    )
    require(
        cfg.sft.average in ("token", "sequence"),
        f"config.sft.average={cfg.sft.average!r}: token or sequence",
    )
    p = cfg.dpo
    require(p.beta > 0, f"config.dpo.beta={p.beta} must be positive")
    require(
        p.nll_weight >= 0, f"config.dpo.nll_weight={p.nll_weight} must be >= 0 (0 turns it off)"
    )
    require(p.loss in ("sigmoid", "ipo"), f"config.dpo.loss={p.loss!r}: sigmoid or ipo")
    require(
        0.0 <= p.label_smoothing < 0.5,
        f"config.dpo.label_smoothing={p.label_smoothing} must be in [0, 0.5)",
    )
    require(
        p.loss == "sigmoid" or p.label_smoothing == 0.0,
        "config.dpo.label_smoothing applies to loss=sigmoid only",
    )
    require(
        p.reference in ("params", "precomputed"),
        f"config.dpo.reference={p.reference!r}: params or precomputed",
    )
    t = cfg.distill
    require(
        obj != "distill" or bool(t.teacher),
        "config.objective='distill' needs config.distill.teacher (a workdir)",
    )
    require(t.temperature > 0, f"config.distill.temperature={t.temperature} must be positive")
    require(0.0 <= t.alpha <= 1.0, f"config.distill.alpha={t.alpha} must be in [0, 1]")


def check_lora_section(lo) -> None:
    require(lo.rank >= 0, f"config.lora.rank={lo.rank} must be >= 0 (0 = off)")
    require(lo.alpha > 0, f"config.lora.alpha={lo.alpha} must be positive")
    require(0.0 <= lo.dropout < 1.0, f"config.lora.dropout={lo.dropout} must be in [0, 1)")
    if lo.rank:
        resolve_targets(lo.targets)  # raises ConfigError naming the bad target


def check_train_section(t) -> None:
    require(t.steps > 0, "config.train.steps must be positive")
    require(t.global_batch_size > 0, "config.train.global_batch_size must be positive")
    require(t.microbatches > 0, "config.train.microbatches must be positive")
    require(
        t.steps_per_dispatch > 0,
        f"config.train.steps_per_dispatch={t.steps_per_dispatch} must be positive (1 = one step per call)",
    )
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(t[key] > 0, f"config.train.{key}={t[key]} must be positive")


def check_optim_section(o) -> None:
    require(
        o.schedule in ("cosine", "linear", "constant"),
        f"config.optim.schedule={o.schedule!r}: cosine, linear or constant",
    )
    require(o.lr > 0, "config.optim.lr must be positive")
    require(
        o.warmup_steps >= 0,  # longer than the run: clipped by optim.effective_warmup
        f"config.optim.warmup_steps={o.warmup_steps} must be >= 0",
    )
    require(o.clip_norm >= 0, "config.optim.clip_norm must be >= 0 (0 = no clipping)")


def check_batch_over_mesh(cfg, mesh: tuple[int, ...]) -> None:
    """Batches divide over the resolved (data, fsdp, tensor) mesh; the step's compile options."""
    t, m = cfg.train, cfg.model
    shards = mesh[0] * mesh[1]
    require(
        t.global_batch_size % (shards * t.microbatches) == 0,
        f"config.train.global_batch_size={t.global_batch_size} must be divisible by data shards "
        f"(mesh data x fsdp = {shards}) x config.train.microbatches={t.microbatches}",
    )
    require(
        t.eval_batch_size >= 0 and (t.eval_batch_size or t.global_batch_size) % shards == 0,
        f"config.train.eval_batch_size={t.eval_batch_size} must be 0 (= global_batch_size) or a "
        f"positive multiple of the data shards (mesh data x fsdp = {shards})",
    )
    require(
        t.get("cpu_opt_level", -1) in (-1, 0, 1, 2, 3),
        f"config.train.cpu_opt_level={t.get('cpu_opt_level')!r}: -1 (XLA's default), 0, 1, 2 or 3",
    )
    grad_sync = t.get("grad_sync", "auto")
    require(
        grad_sync in ("auto", "flat", "spmd"),
        f"config.train.grad_sync={grad_sync!r}: auto, flat or spmd",
    )
    require(
        grad_sync != "flat" or (mesh[1] == 1 and mesh[2] == 1 and m.attention == "xla"),
        f"config.train.grad_sync='flat' needs pure data parallelism with the xla attention "
        f"(mesh fsdp = tensor = 1, model.attention='xla'; here mesh {mesh}, attention "
        f"{m.attention!r}); use 'auto' or 'spmd'",
    )


def check_fault_section(f) -> None:
    require(
        f.spike_factor == 0 or f.spike_factor > 1,
        f"config.fault.spike_factor={f.spike_factor}: 0 (off) or > 1, e.g. 3",
    )
    require(
        f.spike_warn_factor == 0 or f.spike_warn_factor > 1,
        f"config.fault.spike_warn_factor={f.spike_warn_factor}: 0 (off) or > 1, e.g. 3",
    )
    require(
        f.spike_window > 0 and f.max_rollbacks >= 0,
        "config.fault.spike_window must be > 0 and fault.max_rollbacks >= 0",
    )
