"""An independent numpy implementation of the Llama-style forward pass (float64).

Written from the Llama paper/HF description, not from lmtrain's code: RMSNorm, rotate-half RoPE,
grouped-query causal attention restricted to the same segment, SwiGLU MLP.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
    # x: (T, H, Dh); rotate-half layout: pairs (i, i + Dh/2).
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    ang = positions[:, None] * inv[None, :]  # (T, Dh/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def forward(
    params: dict,
    tokens,
    positions,
    segment_ids,
    *,
    n_layers,
    n_heads,
    n_kv_heads,
    eps=1e-5,
    theta=10000.0,
    tie=False,
):
    """Logits (T, V) for one sequence."""
    p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else v for k, v in params.items()}
    x = p["embedding"][tokens]
    T = len(tokens)
    allowed = (np.arange(T)[:, None] >= np.arange(T)[None, :]) & (
        segment_ids[:, None] == segment_ids[None, :]
    )
    for i in range(n_layers):
        lp = params[f"layers_{i}"]
        a = {k: np.asarray(v, np.float64) for k, v in lp["attn"].items()}
        h = rms_norm(x, np.asarray(lp["attn_norm"]["scale"], np.float64), eps)
        q = np.einsum("td,dhe->the", h, a["q_kernel"])
        k = np.einsum("td,dhe->the", h, a["k_kernel"])
        v = np.einsum("td,dhe->the", h, a["v_kernel"])
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        group = n_heads // n_kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        dh = q.shape[-1]
        s = np.einsum("the,she->hts", q, k) / np.sqrt(dh)
        s = np.where(allowed[None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        w = np.exp(s)
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("hts,she->the", w, v)
        x = x + np.einsum("the,hed->td", o, a["o_kernel"])
        m = {k: np.asarray(v, np.float64) for k, v in lp["mlp"].items()}
        h = rms_norm(x, np.asarray(lp["mlp_norm"]["scale"], np.float64), eps)
        g = h @ m["gate_kernel"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_kernel"])) @ m["down_kernel"]
    x = rms_norm(x, np.asarray(params["final_norm"]["scale"], np.float64), eps)
    head = p["embedding"].T if tie else np.asarray(params["lm_head"], np.float64)
    return x @ head
