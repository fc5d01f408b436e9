"""Int8 weight-only quantization: per-channel error bounds, memory, and model logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer
from lmtrain.quant.int8 import (
    QuantizedTensor,
    dequantize_params,
    quantize_params,
    quantize_tensor,
    tree_nbytes,
)


def test_per_channel_scales_and_rounding_bound():
    rng = np.random.RandomState(0)
    w = rng.randn(16, 4, 8).astype(np.float32) * rng.uniform(0.01, 3.0, (1, 4, 8)).astype(
        np.float32
    )
    q = quantize_tensor(w, (0,))
    assert q.values.dtype == np.int8 and q.scale.shape == (1, 4, 8)
    # Each output channel's largest weight maps to ±127; every error is within half a step.
    np.testing.assert_array_equal(np.abs(q.values).max(axis=0), np.full((4, 8), 127))
    np.testing.assert_allclose(q.scale[0], np.abs(w).max(axis=0) / 127.0, rtol=1e-6)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(err <= q.scale / 2 + 1e-7)
    zero = quantize_tensor(np.zeros((3, 2), np.float32), (0,))
    np.testing.assert_array_equal(np.asarray(zero.dequantize()), 0.0)


def test_quantized_model_memory_and_logits():
    cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=32,
        qkv_bias=True,
        dtype="float32",
    )
    model = Transformer(cfg)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 16)))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
    params = jax.tree.map(np.asarray, params)
    q = quantize_params(params)
    kernels = q["layers_0"]["attn"]
    assert isinstance(kernels["q_kernel"], QuantizedTensor) and kernels["q_kernel"].scale.shape == (
        1,
        4,
        16,
    )
    assert isinstance(kernels["o_kernel"], QuantizedTensor) and kernels["o_kernel"].scale.shape == (
        1,
        1,
        64,
    )
    assert isinstance(q["embedding"], QuantizedTensor) and q["embedding"].scale.shape == (64, 1)
    assert not isinstance(kernels["q_bias"], QuantizedTensor)  # biases and norms stay float
    bf16_bytes = tree_nbytes(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert tree_nbytes(q) / bf16_bytes < 0.56
    ref = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    out = np.asarray(
        jax.jit(lambda p, t: model.apply({"params": dequantize_params(p)}, t))(q, tokens)
    )
    err = np.abs(out - ref).max()
    assert 0 < err < 0.02 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9
