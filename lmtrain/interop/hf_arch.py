"""Hugging Face architectures lmtrain reads and writes: config fields and tensor layouts.

Llama, Mistral, Qwen2 and Gemma are the same decoder as ``lmtrain.model.transformer`` up to a few
options (q/k/v biases, tied embeddings, embedding scaling, GELU-tanh MLP, an explicit head
dim). Gemma's RMSNorm multiplies by ``1 + weight``; lmtrain stores the effective scale, so the
offset is added on import and removed on export (exact up to one float32 rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lmtrain.errors import ConfigError
from lmtrain.model.config import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma": True}
_ACT = {
    "silu": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu_tanh",
}


def supported_message() -> str:
    return ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())


def detect_model_type(hf: dict) -> str:
    model_type = hf.get("model_type", "")
    if model_type not in ARCHITECTURES:
        archs = hf.get("architectures") or []
        raise ConfigError(
            f"unsupported Hugging Face architecture {model_type or archs!r}: lmtrain imports "
            f"{supported_message()}"
        )
    return model_type


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = (
        params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    if rope_type != "default":
        raise ConfigError(
            f"rope scaling {rope_type!r} is not supported (only plain RoPE); "
            "lmtrain's attention has no scaled-frequency variant yet"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_fields_from_hf(hf: dict) -> dict:
    """``ModelConfig`` fields for a Hugging Face ``config.json`` (clear errors for what differs)."""
    mt = detect_model_type(hf)
    n_heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or d_model // n_heads)
    if mt in ("llama", "mistral") and hf.get("attention_bias"):
        raise ConfigError(f"{mt} with attention_bias=true (bias on o_proj too) is not supported")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{mt} with mlp_bias=true is not supported")
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if mt == "gemma" and hf.get("hidden_activation") is None:
        act_name = "gelu_pytorch_tanh"  # Gemma always uses the tanh approximation
    if act_name not in _ACT:
        raise ConfigError(
            f"{mt}: activation {act_name!r} is not supported (silu or gelu_pytorch_tanh)"
        )
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window and (mt == "mistral" or hf.get("use_sliding_window")):
        # Within the window, sliding-window attention equals full attention: cap the context.
        max_len = min(max_len, int(window))
    return {
        "vocab_size": int(hf["vocab_size"]),
        "d_model": d_model,
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
        "head_dim": 0 if head_dim * n_heads == d_model else head_dim,
        "d_ff": int(hf["intermediate_size"]),
        "max_seq_len": max_len,
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", _TIE_DEFAULT[mt])),
        "qkv_bias": mt == "qwen2",
        "embed_scale": mt == "gemma",
        "mlp_activation": _ACT[act_name],
    }


def model_type_for(cfg: ModelConfig, preferred: str | None = None) -> str:
    """The Hugging Face architecture that computes exactly what this lmtrain model computes."""
    if cfg.qkv_bias:
        want = "qwen2"
    elif cfg.embed_scale or cfg.mlp_activation == "gelu_tanh":
        want = "gemma"
        if not (cfg.embed_scale and cfg.mlp_activation == "gelu_tanh" and cfg.tie_embeddings):
            raise ConfigError(
                "no Hugging Face architecture matches this model: Gemma needs embed_scale, "
                "mlp_activation=gelu_tanh and tie_embeddings together"
            )
    else:
        want = "mistral" if preferred == "mistral" else "llama"
    if want == "qwen2" and cfg.mlp_activation != "silu":
        raise ConfigError("no Hugging Face architecture matches q/k/v biases with a GELU MLP")
    return want


def hf_config(cfg: ModelConfig, model_type: str, *, dtype: str, special_ids: dict) -> dict:
    """A ``config.json`` that ``AutoModelForCausalLM`` loads with no custom code."""
    head_dim = cfg.kv_dim
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers < 5 reads rope_theta, >= 5 reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "gelu_pytorch_tanh" if cfg.mlp_activation == "gelu_tanh" else "silu",
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    if model_type in ("llama", "mistral"):
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "mistral":
        out["sliding_window"] = None
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if model_type == "gemma":
        out["hidden_activation"] = "gelu_pytorch_tanh"
    out.update({k: v for k, v in special_ids.items() if v is not None and v >= 0})
    return out


# Tensor layouts. HF linear weights are (out, in); lmtrain kernels are (in, out) with heads split.
def _proj_in(cfg: ModelConfig, heads: int):
    d, hd = cfg.d_model, cfg.kv_dim
    return (lambda w: w.T.reshape(d, heads, hd)), (lambda w: w.reshape(d, heads * hd).T)


def _bias(heads: int, hd: int):
    return (lambda w: w.reshape(heads, hd)), (lambda w: w.reshape(heads * hd))


def _proj_out(cfg: ModelConfig):
    h, hd, d = cfg.n_heads, cfg.kv_dim, cfg.d_model
    return (lambda w: w.T.reshape(h, hd, d)), (lambda w: w.reshape(h * hd, d).T)


_LINEAR = (lambda w: w.T), (lambda w: w.T)
_SAME = (lambda w: w), (lambda w: w)
_GEMMA_NORM = (lambda w: w.astype(np.float32) + 1.0), (lambda w: w.astype(np.float32) - 1.0)

Convert = Callable[[np.ndarray], np.ndarray]


def tensor_map(
    cfg: ModelConfig, model_type: str
) -> list[tuple[str, tuple[str, ...], Convert, Convert]]:
    """(HF name, lmtrain param path, to_lmtrain, to_hf) for every weight of the model."""
    norm = _GEMMA_NORM if model_type == "gemma" else _SAME
    rows = [("model.embed_tokens.weight", ("embedding",), *_SAME)]
    for i in range(cfg.n_layers):
        hf, lm = f"model.layers.{i}.", f"layers_{i}"
        attn = [
            ("q_proj", "q_kernel", _proj_in(cfg, cfg.n_heads)),
            ("k_proj", "k_kernel", _proj_in(cfg, cfg.n_kv_heads)),
            ("v_proj", "v_kernel", _proj_in(cfg, cfg.n_kv_heads)),
            ("o_proj", "o_kernel", _proj_out(cfg)),
        ]
        rows += [(f"{hf}self_attn.{a}.weight", (lm, "attn", b), *fns) for a, b, fns in attn]
        if cfg.qkv_bias:
            for a, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
                rows.append(
                    (
                        f"{hf}self_attn.{a}_proj.bias",
                        (lm, "attn", f"{a}_bias"),
                        *_bias(heads, cfg.kv_dim),
                    )
                )
        for a in ("gate", "up", "down"):
            rows.append((f"{hf}mlp.{a}_proj.weight", (lm, "mlp", f"{a}_kernel"), *_LINEAR))
        rows.append((f"{hf}input_layernorm.weight", (lm, "attn_norm", "scale"), *norm))
        rows.append((f"{hf}post_attention_layernorm.weight", (lm, "mlp_norm", "scale"), *norm))
    rows.append(("model.norm.weight", ("final_norm", "scale"), *norm))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head",), *_LINEAR))
    return rows


# Tensors a checkpoint may carry that the model recomputes or shares.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
