"""Config checks of ``config.rl`` (online RL), called from ``lmtrain.train.config_check.validate``."""

from __future__ import annotations

RL_OBJECTIVES = ("grpo", "ppo")


def validate_rl(cfg, need) -> None:
    """``need(cond, message)`` raises ConfigError with the message when ``cond`` is false."""
    r = cfg.rl
    need(r.group_size >= 1, f"config.rl.group_size={r.group_size} must be >= 1")
    need(r.num_iterations >= 1, f"config.rl.num_iterations={r.num_iterations} must be >= 1")
    need(r.max_new_tokens >= 1, f"config.rl.max_new_tokens={r.max_new_tokens} must be >= 1")
    need(r.beta >= 0, f"config.rl.beta={r.beta} must be >= 0 (0 = no KL, no reference pass)")
    need(
        0 <= r.epsilon_low < 1 and r.epsilon_high >= 0,
        f"config.rl.epsilon_low={r.epsilon_low} must be in [0, 1) and epsilon_high >= 0",
    )
    need(
        r.loss_norm in ("sequence", "token", "constant"),
        f"config.rl.loss_norm={r.loss_norm!r}: sequence, token or constant",
    )
    need(
        r.importance_level in ("token", "sequence"),
        f"config.rl.importance_level={r.importance_level!r}: token or sequence (GSPO)",
    )
    need(
        r.temperature >= 0 and 0 < r.top_p <= 1 and r.top_k >= 0,
        "config.rl: temperature >= 0, 0 < top_p <= 1 and top_k >= 0",
    )
    if cfg.objective not in RL_OBJECTIVES:
        return
    t = cfg.train
    need(
        t.global_batch_size % r.group_size == 0,
        f"config.train.global_batch_size={t.global_batch_size} must be a multiple of "
        f"config.rl.group_size={r.group_size} (each prompt gets a group of completions)",
    )
    need(
        r.max_new_tokens < cfg.data.seq_len,
        f"config.rl.max_new_tokens={r.max_new_tokens} must be below config.data.seq_len="
        f"{cfg.data.seq_len} (prompt + completion share a row)",
    )
    room = cfg.data.seq_len + 1 - r.max_new_tokens
    need(
        0 <= r.get("max_prompt_len", 0) <= room,
        f"config.rl.max_prompt_len={r.get('max_prompt_len', 0)} must be in [0, {room}] (0 = all "
        "of config.data.seq_len + 1 - config.rl.max_new_tokens)",
    )
    need(
        t.get("steps_per_dispatch", 1) == 1,
        "config.train.steps_per_dispatch must be 1 for online RL (each step may need a rollout)",
    )
    need(
        cfg.fault.spike_factor == 0,
        "config.fault.spike_factor must be 0 for online RL (a rollback cannot replay rollouts)",
    )
