"""The model's hyper-parameters as a frozen dataclass (hashable, so Flax modules can hold it)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lmtrain.errors import require

# Activation checkpointing policies of ``model.remat`` (lmtrain/model/transformer.py applies them).
REMAT_POLICIES = ("none", "full", "dots", "save_attn_out", "save_dots_and_attn_out", "offload")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model section of a run config. These defaults are the defaults of ``config.model``:
    ``section_defaults`` gives them to ``lmtrain.config.base_config``, so they live here only."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
    mlp_activation: str = "silu"  # silu (Llama) | gelu_tanh (Gemma)
    dtype: str = "bfloat16"  # compute dtype: activations and elementwise maths
    matmul_dtype: str = ""  # operands of matmuls ("" = dtype); accumulation is always float32
    # float32 activations with bfloat16 matmul operands is the fast mix on CPUs with AMX /
    # AVX512-BF16 (docs/performance.md).
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    @property
    def kv_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def matmul_compute_dtype(self):
        return jnp.dtype(self.matmul_dtype or self.dtype)

    @property
    def custom_matmul_grads(self) -> bool:
        """Custom VJPs for the matmuls and attention (lmtrain/model/matmul.py) only without a remat
        policy: they would hide their dots from the policies that save dots."""
        return self.remat == "none"

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @classmethod
    def section_defaults(cls) -> dict:
        """``{field: default}`` in field order: the ``model`` section of ``base_config``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(model_cfg).items() if k in fields})

    def param_count(self) -> int:
        """Closed-form parameter count (tested against the initialised model)."""
        d, h, kv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.kv_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        mlp = 3 * d * self.d_ff
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return embed + self.n_layers * per_layer + d + head


def check_model_section(m) -> None:
    """The ``config.model`` section's values (the attention backend's availability on this
    host is ``lmtrain.model.attention_kernels.check_available``)."""
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        require(m[key] > 0, f"config.model.{key}={m[key]} must be positive")
    require(m.vocab_size >= 0, "config.model.vocab_size must be >= 0 (0 = from the tokenizer)")
    require(
        m.n_kv_heads <= m.n_heads,
        f"config.model.n_kv_heads={m.n_kv_heads} must be <= model.n_heads={m.n_heads}",
    )
    require(
        m.n_heads % m.n_kv_heads == 0,
        f"config.model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}",
    )
    head_dim = m.head_dim or m.d_model // m.n_heads
    require(
        m.head_dim > 0 or m.d_model % m.n_heads == 0,
        f"config.model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} (or set model.head_dim)",
    )
    require(
        head_dim % 2 == 0,
        f"head dim {head_dim} must be even for rotary embeddings (config.model.head_dim)",
    )
    for key in ("dtype", "param_dtype", "matmul_dtype"):
        allowed = ("float32", "bfloat16", "float16") + (("",) if key == "matmul_dtype" else ())
        require(
            m[key] in allowed,
            f"config.model.{key}={m[key]!r}: use float32, bfloat16 or float16"
            + (' (or "" for model.dtype)' if key == "matmul_dtype" else ""),
        )
    require(
        m.remat in REMAT_POLICIES,
        f"config.model.remat={m.remat!r}: choose one of {REMAT_POLICIES}",
    )
    require(
        m.mlp_activation in ("silu", "gelu_tanh"),
        f"config.model.mlp_activation={m.mlp_activation!r}: silu or gelu_tanh",
    )
