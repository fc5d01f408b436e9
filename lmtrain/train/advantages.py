"""Advantages for online RL, on the host after each rollout: GRPO groups, GAE, whitening.

Row layout (B, T): ``mask`` is 1 on a row's completion tokens (contiguous), values and rewards
are per token; a sequence-level reward sits on the row's last completion token.
"""

from __future__ import annotations

import numpy as np


def group_advantages(
    rewards: np.ndarray, group_size: int, scale: bool = True, eps: float = 1e-4
) -> np.ndarray:
    """GRPO: ``(r - mean of its group) / (std of its group + eps)``; ``scale=False`` (Dr.GRPO)
    skips the division. Rows come in consecutive groups of ``group_size`` (one prompt each);
    the std is the unbiased one (``ddof=1``), as TRL's ``GRPOTrainer`` computes it."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    adv = r - r.mean(axis=1, keepdims=True)
    if scale:
        std = r.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(adv)
        adv = adv / (std + eps)
    return adv.reshape(-1).astype(np.float32)


def sequence_rewards_on_last_token(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, T) per-token rewards: each row's score on its last completion token, 0 elsewhere."""
    out = np.zeros(mask.shape, np.float32)
    has = mask.sum(axis=1) > 0
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    out[np.arange(len(out))[has], last[has]] = np.asarray(scores, np.float32)[has]
    return out


def gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over each row's completion tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` after the last completion token is 0) and
    ``A_t = delta_t + gamma lam A_{t+1}``; returns ``(advantages, returns = A + V)``, 0 off mask.
    """
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64) * mask
    m = np.asarray(mask, np.float64)
    B, T = m.shape
    adv = np.zeros((B, T))
    last = np.zeros(B)
    for t in reversed(range(T)):
        nm = m[:, t + 1] if t + 1 < T else np.zeros(B)
        nv = v[:, t + 1] * nm if t + 1 < T else np.zeros(B)
        delta = r[:, t] + gamma * nv - v[:, t]
        last = delta + gamma * lam * nm * last
        adv[:, t] = last * m[:, t]
    return adv.astype(np.float32), ((adv + v) * m).astype(np.float32)


def whiten(x: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``(x - mean) / std`` over the masked entries (PPO's advantage normalisation)."""
    m = np.asarray(mask, bool)
    sel = np.asarray(x, np.float64)[m]
    if sel.size < 2:
        return np.asarray(x, np.float32) * m
    out = (np.asarray(x, np.float64) - sel.mean()) / (sel.std() + eps)
    return (out * m).astype(np.float32)
