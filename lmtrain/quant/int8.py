"""Int8 weight-only quantization for inference, with one float32 scale per output channel.

Every matmul weight (attention and MLP kernels, the LM head, the embedding table) is stored as
``int8`` plus a scale per output channel: ``w ≈ q * scale`` with ``scale = max|w| / 127`` over
the input axes, so each channel uses the full int8 range and the rounding error is at most
``scale / 2``. Norm scales and biases stay in float. The model runs on weights dequantized
inside the jitted function, so only the int8 copy lives in memory between calls.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Number of leading input axes per kernel name; the remaining axes are output channels.
INPUT_AXES = {
    "q_kernel": 1,
    "k_kernel": 1,
    "v_kernel": 1,
    "o_kernel": 2,
    "gate_kernel": 1,
    "up_kernel": 1,
    "down_kernel": 1,
    "lm_head": 1,
}


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class QuantizedTensor:
    """``values`` int8 with the weight's shape; ``scale`` float32 broadcastable to it."""

    values: jax.Array
    scale: jax.Array

    def tree_flatten(self):
        return (self.values, self.scale), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.asarray(self.values).nbytes + np.asarray(self.scale).nbytes)


def quantize_tensor(w, input_axes: tuple[int, ...]) -> QuantizedTensor:
    """Symmetric per-channel int8: the max over ``input_axes`` maps to ±127."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=input_axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return QuantizedTensor(q, scale)


def _axes_for(name: str, ndim: int) -> tuple[int, ...] | None:
    if name == "embedding":
        return (1,)  # one scale per token row: rows are what a lookup (and a tied head) reads
    if name in INPUT_AXES:
        return tuple(range(INPUT_AXES[name]))
    return None


def quantize_params(params: dict) -> dict:
    """The params tree with every matmul weight replaced by a ``QuantizedTensor``."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            out[name] = quantize_params(value)
            continue
        axes = _axes_for(name, np.ndim(value))
        out[name] = quantize_tensor(value, axes) if axes is not None else np.asarray(value)
    return out


def dequantize_params(qparams: dict, dtype=jnp.float32) -> dict:
    """Back to a plain tree (call inside ``jit`` so XLA fuses the scaling into the consumers)."""
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if isinstance(x, QuantizedTensor) else jnp.asarray(x, dtype),
        qparams,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )


def tree_nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
