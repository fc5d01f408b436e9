"""Low-precision matmuls: bf16 operands, float32 accumulation, gradients through bf16 dots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.model import matmul

SPECS = [
    ("btd,df->btf", (3, 5, 16), (16, 24)),
    ("btd,dhe->bhte", (2, 7, 16), (16, 3, 8)),
    ("bhte,hed->btd", (2, 3, 7, 8), (3, 8, 16)),
    ("bkgtd,bksd->bkgts", (2, 2, 2, 5, 8), (2, 2, 5, 8)),
    ("bkgts,bksd->bkgtd", (2, 2, 2, 5, 5), (2, 2, 5, 8)),
]


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and back, in float64 for the reference."""
    return np.asarray(
        jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64
    )


@pytest.mark.parametrize("spec,xs,ws", SPECS)
def test_bf16_einsum_values_and_grads_match_numpy(spec, xs, ws):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    out = matmul.einsum(spec, jnp.asarray(x), jnp.asarray(w), jnp.bfloat16)
    assert out.dtype == jnp.float32
    ref = np.einsum(spec, _bf16(x), _bf16(w))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)

    r = rng.standard_normal(ref.shape).astype(np.float32)
    loss = lambda a, b: jnp.sum(matmul.einsum(spec, a, b, jnp.bfloat16) * r)  # noqa: E731
    dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    ins, o = spec.split("->")
    a, b = ins.split(",")
    # Mixed precision: the cotangent enters the backward dots in bf16, as the operands do.
    np.testing.assert_allclose(
        np.asarray(dx), np.einsum(f"{o},{b}->{a}", _bf16(r), _bf16(w)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(dw), np.einsum(f"{a},{o}->{b}", _bf16(x), _bf16(r)), rtol=1e-5, atol=1e-5
    )


def test_every_dot_of_the_bf16_gradient_takes_bf16_operands_and_gives_float32():
    """The property that makes it fast on CPU: no dot runs on float32 operands or to bf16."""
    x = jnp.ones((4, 8, 16))
    w = jnp.ones((16, 32))
    grad = jax.grad(lambda a, b: jnp.sum(matmul.einsum("btd,df->btf", a, b, jnp.bfloat16)), (0, 1))
    dots = [e for e in jax.make_jaxpr(grad)(x, w).eqns if e.primitive.name == "dot_general"]
    dots += [
        e
        for eq in jax.make_jaxpr(grad)(x, w).eqns
        for sub in jax.core.jaxprs_in_params(eq.params)
        for e in sub.eqns
        if e.primitive.name == "dot_general"
    ]
    assert len(dots) >= 3  # forward, d/dx, d/dw
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert e.outvars[0].aval.dtype == jnp.float32


def test_float32_einsum_is_plain_einsum():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    out = matmul.einsum("ab,bc->ac", jnp.asarray(x), jnp.asarray(w), jnp.float32)
    np.testing.assert_allclose(np.asarray(out), x.astype(np.float64) @ w, rtol=1e-5)
