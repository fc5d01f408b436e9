"""Attention cores agree with a numpy reference (causal + packed segments + GQA), and say when they
cannot run. The Pallas TPU kernels (splash, flash) run on CPU through the Pallas interpreter."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lmtrain.config import base_config
from lmtrain.errors import ConfigError
from lmtrain.model import attention_kernels as ak
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh, mesh_rules
from lmtrain.model.transformer import Transformer
from lmtrain.train.config_check import validate

B, T, H, K, D = 2, 128, 4, 2, 16  # the TPU kernels tile by 128


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k = rng.normal(size=(B, T, K, D)).astype(np.float32)
    v = rng.normal(size=(B, T, K, D)).astype(np.float32)
    # Row 0: three packed documents; row 1: one document then right padding (segment 0).
    seg = np.stack([np.repeat([1, 2, 3], [40, 60, 28]), np.r_[np.ones(100), np.zeros(28)]])
    return q, k, v, seg.astype(np.int32)


def numpy_attention(q, k, v, seg):
    """Independent reference: per (batch, head) loops, float64."""
    out = np.zeros(q.shape, np.float64)
    g = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        allowed = (
            np.tril(np.ones((T, T), bool))
            & (seg[b][:, None] == seg[b][None, :])
            & (seg[b][None, :] != 0)
        )
        for h in range(q.shape[2]):
            s = q[b, :, h].astype(np.float64) @ k[b, :, h // g].T.astype(np.float64) / np.sqrt(D)
            s = np.where(allowed, s, -1e30)
            p = np.exp(s - s.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            out[b, :, h] = p @ v[b, :, h // g]
    return out


def _valid(seg):
    return (seg != 0)[:, :, None, None]  # padding queries are don't-care rows


def _run(impl, q, k, v, seg):
    if impl in ("splash", "flash"):
        with ak.interpret_pallas_kernels():
            return ak.causal_self_attention(impl, q, k, v, seg)
    return ak.causal_self_attention(impl, q, k, v, seg)


@pytest.mark.parametrize("impl", ["xla", "splash", "flash"])
def test_forward_matches_numpy_reference(impl):
    q, k, v, seg = _inputs()
    got = np.asarray(_run(impl, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg)))
    want = numpy_attention(q, k, v, seg)
    np.testing.assert_allclose(
        np.where(_valid(seg), got, 0), np.where(_valid(seg), want, 0), atol=2e-5, rtol=2e-5
    )


@pytest.mark.parametrize("impl", ["splash", "flash"])
def test_gradients_match_xla(impl):
    q, k, v, seg = (jnp.asarray(a) for a in _inputs(1))
    w = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, H, D)), jnp.float32)
    w = w * _valid(np.asarray(seg))

    def loss(impl_, q, k, v):
        return jnp.sum(_run(impl_, q, k, v, seg) * w)

    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    # Flash's backward kernels are traced after _run returns: keep the interpreter on for them.
    ctx = pltpu.force_tpu_interpret_mode() if impl == "flash" else contextlib.nullcontext()
    with ctx:
        got = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5, rtol=5e-5)


def _head_major(q, k, v):
    return (jnp.swapaxes(jnp.asarray(a), 1, 2) for a in (q, k, v))


@pytest.mark.parametrize("mm", ["float32", "bfloat16"])
def test_head_major_flash_style_backward_matches_numpy_and_autodiff(mm):
    """The training core's custom VJP (rowsum(dO*O) softmax backward) against the numpy forward
    and JAX's own differentiation of the same maths."""
    q, k, v, seg = _inputs(3)
    w = np.random.default_rng(4).normal(size=(B, H, T, D)).astype(np.float32)
    w = w * np.swapaxes(_valid(seg), 1, 2)
    qh, kh, vh = _head_major(q, k, v)

    def loss(custom, q_, k_, v_):
        out = ak.xla_attention_head_major(q_, k_, v_, jnp.asarray(seg), mm, custom_grad=custom)
        return jnp.sum(out * w), out

    (_, out), got = jax.value_and_grad(lambda *a: loss(True, *a), argnums=(0, 1, 2), has_aux=True)(
        qh, kh, vh
    )
    want = jax.grad(lambda *a: loss(False, *a)[0], argnums=(0, 1, 2))(qh, kh, vh)
    tol = 2e-5 if mm == "float32" else 3e-2
    ref = np.swapaxes(numpy_attention(q, k, v, seg), 1, 2)
    valid = np.swapaxes(_valid(seg), 1, 2)
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=tol, rtol=tol)
    for g, r in zip(got, want):
        scale = np.abs(np.asarray(r)).max()
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=tol)


def test_rope_tables_match_the_formula_and_mark_positions_past_the_table():
    from lmtrain.model.attention import rope_tables

    positions = jnp.asarray([[0, 1, 2, 63], [5, 0, 64, 200]], jnp.int32)
    cos_f, sin_f = rope_tables(positions, 32, 10000.0)  # computed in the graph
    cos_t, sin_t = rope_tables(positions, 32, 10000.0, table_len=64)  # gathered
    inv = 1.0 / 10000.0 ** (np.arange(0, 32, 2) / 32)
    angles = np.asarray(positions, np.float64)[..., None] * inv
    inside = np.asarray(positions) < 64
    for got, fn in ((cos_t, np.cos), (sin_t, np.sin)):
        np.testing.assert_allclose(np.asarray(got)[inside], fn(angles)[inside], atol=2e-6)
        assert np.isnan(np.asarray(got)[~inside]).all()  # past the table: loud, not clamped
    np.testing.assert_allclose(np.asarray(cos_f), np.cos(angles), atol=5e-5)
    np.testing.assert_allclose(np.asarray(sin_f), np.sin(angles), atol=5e-5)


def test_xla_core_is_the_models_reference_path():
    """attention.py's names are the kernels module's (one implementation, not a copy)."""
    from lmtrain.model import attention

    assert attention.dot_product_attention is ak.dot_product_attention
    assert attention.attention_mask is ak.attention_mask


def test_splash_model_under_8_device_mesh_matches_xla():
    """The shard_map path (batch over data x fsdp, heads over tensor) gives the xla model's logits."""
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=T,
        dtype="float32",
    )
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (8, T)), jnp.int32)
    seg = jnp.asarray(np.tile(np.repeat([1, 2], [50, T - 50]), (8, 1)), jnp.int32)
    pos = jnp.asarray(np.tile(np.r_[np.arange(50), np.arange(T - 50)], (8, 1)), jnp.int32)
    import flax.linen as nn

    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens[:1]))
    ref = Transformer(cfg).apply(params, tokens, pos, seg)
    mesh = make_mesh((2, 2, 2))
    splash = Transformer(ModelConfig(**{**cfg.__dict__, "attention": "splash"}))
    with mesh_rules(mesh), ak.interpret_pallas_kernels():  # the trainer's context
        got = jax.jit(splash.apply)(params, tokens, pos, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("impl", "needs"), [("cudnn", "NVIDIA GPU"), ("splash", "TPU"), ("flash", "TPU")]
)
def test_unavailable_backend_is_a_config_error(impl, needs):
    with pytest.raises(ConfigError, match=f"attention='{impl}'.*{needs}.*attention=xla"):
        ak.check_available(impl, platform="cpu")


def test_validate_rejects_unknown_and_unavailable():
    cfg = base_config()
    cfg.data.path = "x.txt"
    cfg.model.attention = "flashy"
    with pytest.raises(ConfigError, match="choose one of"):
        validate(cfg, 1)
    cfg.model.attention = "cudnn"
    if jax.default_backend() != "gpu":
        with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
            validate(cfg, 1)
    with pytest.raises(ConfigError, match="bfloat16"):
        ak.check_available("cudnn", platform="gpu", dtype="float32")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_numpy_reference_on_gpu():
    q, k, v, seg = _inputs()
    args = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    got = np.asarray(ak.causal_self_attention("cudnn", *args, jnp.asarray(seg)), np.float32)
    want = numpy_attention(*(np.asarray(a, np.float32) for a in args), seg)
    np.testing.assert_allclose(
        np.where(_valid(seg), got, 0), np.where(_valid(seg), want, 0), atol=3e-2, rtol=3e-2
    )
