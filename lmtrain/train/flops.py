"""FLOPs per token and model FLOPs utilisation (MFU), with one table of peak FLOP/s per device.

Training FLOPs per token = 6·N + 6·L·H·Dh·T, where N counts every parameter that takes part in a
matmul (all weights except the input embedding table, which is a lookup; a tied embedding counts
once, as the output head), L layers, H query heads of width Dh, T the sequence length. The
attention term is the score and value matmuls (2·2·L·H·Dh·T forward, x3 with the backward) for a
causal mask counted once: half of the full T×T matrix, as in MaxText and the PaLM appendix.
"""

from __future__ import annotations

import jax

from lmtrain.model.config import ModelConfig

# Dense bf16 peak per device; for CPU a float32 matmul peak, since CPUs publish none (the
# figure and its machine are in docs/performance.md).
PEAK_FLOPS = {
    "cpu": 3.0e11,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    return cfg.param_count() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attn = 6 * cfg.n_layers * cfg.n_heads * cfg.kv_dim * seq_len
    return 6 * matmul_params(cfg) + attn


def device_peak_flops(device: jax.Device | None = None) -> float:
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform == "cpu":
        return PEAK_FLOPS["cpu"]
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return 0.0
