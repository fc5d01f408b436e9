"""Matmuls in the compute dtype, accumulated in float32, with gradients that stay in that dtype.

Why a helper: XLA:CPU runs a bf16 x bf16 dot fast (AMX / AVX512-BF16) only when its output is
float32; a dot whose output is bf16 is rewritten to a slower float32 dot plus converts
(docs/performance.md). Autodiff of ``einsum(..., preferred_element_type=f32)``
feeds the float32 cotangent to the backward dots, so they run in float32 too. :func:`einsum`
therefore casts the cotangent to the compute dtype itself (a custom VJP), which is the usual mixed
precision on GPUs and TPUs as well: bf16 operands and float32 accumulation in all three GEMMs.

A custom VJP hides its dots from remat policies (``dots``, ``save_dots_and_attn_out``), so callers
pass ``custom_grad=False`` when a policy is set and get plain low-precision dots instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _operands(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_lowp(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    return _fwd(spec, x, w, dtype)[0]


def _fwd(spec, x, w, dtype):
    xl, wl = x.astype(dtype), w.astype(dtype)
    out = jnp.einsum(spec, xl, wl, preferred_element_type=jnp.float32)
    # Residuals in the low dtype; zero-size markers carry the operands' own dtypes to the VJP.
    return out, (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _bwd(spec, dtype, res, g):
    xl, wl, x_marker, w_marker = res
    a, b, out = _operands(spec)
    gl = g.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", gl, wl, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{a},{out}->{b}", xl, gl, preferred_element_type=jnp.float32)
    return dx.astype(x_marker.dtype), dw.astype(w_marker.dtype)


_einsum_lowp.defvjp(_fwd, _bwd)


def _differentiable_by_spec(spec: str) -> bool:
    """Each operand index must appear in the other operand or the output (no lone sums)."""
    a, b, out = _operands(spec)
    return set(a) <= set(b) | set(out) and set(b) <= set(a) | set(out)


def einsum(spec: str, x: jax.Array, w: jax.Array, dtype, custom_grad: bool = True) -> jax.Array:
    """``einsum`` of two operands in ``dtype``; float32 output for low-precision ``dtype``.

    The result is float32 whenever ``dtype`` is below float32 (callers cast where they want), so
    that the dot keeps the fast bf16 path on every backend.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32 or dtype.itemsize >= 4:
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))
    if custom_grad and _differentiable_by_spec(spec):
        return _einsum_lowp(spec, x, w, dtype)
    # Under remat policies: plain dots with a low-precision result, so that JAX's backward dots
    # also take low-precision operands (a float32 result would hand them a float32 cotangent).
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype)).astype(jnp.float32)
