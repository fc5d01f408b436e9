"""Llama-style decoder: embedding → N × (RMSNorm, GQA+RoPE, RMSNorm, SwiGLU) → RMSNorm → logits.

Params are float32 and carry logical axis names (``embed``, ``heads``, ``kv_heads``, ``kv``,
``mlp``, ``vocab``); compute runs in ``cfg.dtype``; logits come out float32 for the loss.
Shapes are suffixed on names: B batch, T length, D model width, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmtrain.model import matmul
from lmtrain.model.attention import Attention
from lmtrain.model.config import REMAT_POLICIES as REMAT_POLICIES  # the names remat_policy takes
from lmtrain.model.config import ModelConfig

ONE_HOT_EMBED_MAX_VOCAB = 2048


def remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.dots_with_no_batch_dims_saveable,
        "save_attn_out": cp.save_only_these_names("attn_out"),
        "save_dots_and_attn_out": cp.save_from_both_policies(
            cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names("attn_out")
        ),
        # The "dots" residuals, kept in pinned host memory instead of device memory.
        "offload": cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[name]


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        std_in = cfg.d_model**-0.5
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std_in), ("embed", "mlp"))
        w_gate = self.param("gate_kernel", init, (cfg.d_model, cfg.d_ff), cfg.params_dtype)
        w_up = self.param("up_kernel", init, (cfg.d_model, cfg.d_ff), cfg.params_dtype)
        # gate and up in one matmul; params stay separate (1:1 with HF checkpoints).
        w = jnp.concatenate([w_gate, w_up], axis=1)
        gate_up = matmul.einsum(
            "btd,df->btf", x_BTD, w, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
        ).astype(cfg.compute_dtype)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        act = (
            jax.nn.silu(gate)
            if cfg.mlp_activation == "silu"
            else jax.nn.gelu(gate, approximate=True)
        )
        h = nn.with_logical_constraint(act * up, ("batch", "length", "mlp"))
        std_out = cfg.d_ff**-0.5 / (2 * cfg.n_layers) ** 0.5
        w_down = self.param(
            "down_kernel",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=std_out), ("mlp", "embed")),
            (cfg.d_ff, cfg.d_model),
            cfg.params_dtype,
        )
        return matmul.einsum(
            "btf,fd->btd", h, w_down, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
        ).astype(cfg.compute_dtype)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache=None, cache_offset=None):
        cfg = self.cfg
        h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BTD)
        a, new_cache = Attention(cfg, name="attn")(
            h, positions_BT, segment_ids_BT, kv_cache, cache_offset
        )
        x_BTD = x_BTD + a
        h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BTD)
        x_BTD = x_BTD + MLP(cfg, name="mlp")(h)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))
        return checkpoint_name(x_BTD, "block_out"), new_cache


class Transformer(nn.Module):
    """``apply(params, tokens, positions, segment_ids)`` → float32 logits (B, T, V).

    With ``kv_cache`` (see ``init_cache``) and ``cache_offset`` it decodes incrementally and
    returns ``(logits, new_cache)``; ``return_hidden=True`` returns the final hidden states instead
    of logits (reward heads use them).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        positions_BT=None,
        segment_ids_BT=None,
        kv_cache=None,
        cache_offset=None,
        return_hidden: bool = False,
    ):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            cfg.params_dtype,
        )
        if cfg.vocab_size <= ONE_HOT_EMBED_MAX_VOCAB:
            # Small vocabularies: a one-hot matmul beats gather/scatter-add (notably on CPU).
            onehot = jax.nn.one_hot(tokens_BT, cfg.vocab_size, dtype=cfg.compute_dtype)
            x = matmul.einsum(
                "btv,vd->btd", onehot, embedding, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
            )
            x = x.astype(cfg.compute_dtype)
        else:
            x = jnp.take(embedding, tokens_BT, axis=0).astype(cfg.compute_dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model**0.5, cfg.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(Block, policy=remat_policy(cfg.remat), static_argnums=())
        new_layers = []
        seg_all = None
        if kv_cache is not None:
            seg_all = jax.lax.dynamic_update_slice_in_dim(
                kv_cache["seg"], segment_ids_BT.astype(kv_cache["seg"].dtype), cache_offset, 1
            )
        for i in range(cfg.n_layers):
            layer_cache = None
            if kv_cache is not None:
                layer_cache = dict(kv_cache["layers"][i], seg=seg_all)
            x, c = block_cls(cfg, name=f"layers_{i}")(
                x, positions_BT, segment_ids_BT, layer_cache, cache_offset
            )
            new_layers.append(c)
        x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)
        if return_hidden:
            out = x.astype(jnp.float32)
        elif cfg.tie_embeddings:
            out = matmul.einsum(
                "btd,vd->btv", x, embedding, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
            )
        else:
            w = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.d_model**-0.5), ("embed", "vocab")
                ),
                (cfg.d_model, cfg.vocab_size),
                cfg.params_dtype,
            )
            out = matmul.einsum(
                "btd,dv->btv", x, w, cfg.matmul_compute_dtype, cfg.custom_matmul_grads
            )
        if not return_hidden:
            out = nn.with_logical_constraint(out, ("batch", "length", "vocab"))
        if kv_cache is None:
            return out
        return out, {"seg": seg_all, "layers": new_layers}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: segment 0 marks empty slots, which are never attended."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, max_len, cfg.n_kv_heads, cfg.kv_dim)
    layers = [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)
    ]
    return {"seg": jnp.zeros((batch, max_len), jnp.int32), "layers": layers}
