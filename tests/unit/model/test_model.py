"""The model against an independent numpy forward; causality; packed-document isolation; sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer
from tests.support import numpy_reference


def make(tie=False, n_kv_heads=2, dtype="float32", vocab=50, matmul_dtype=""):
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=48,
        max_seq_len=32,
        dtype=dtype,
        matmul_dtype=matmul_dtype,
        tie_embeddings=tie,
    )
    model = Transformer(cfg)
    params = nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    # Non-trivial norm scales so the reference checks they are applied.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x * (1 + 0.1 * jnp.arange(x.shape[-1]) / x.shape[-1]) if "scale" in str(p) else x
        ),
        params,
    )
    return cfg, model, params


@pytest.mark.parametrize("tie,n_kv", [(False, 2), (True, 4), (False, 1)])
def test_forward_matches_numpy_reference_with_packing(tie, n_kv):
    cfg, model, params = make(tie=tie, n_kv_heads=n_kv)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, 20)
    seg = np.array([1] * 7 + [2] * 9 + [3] * 4)
    pos = np.concatenate([np.arange(7), np.arange(9), np.arange(4)])
    got = model.apply({"params": params}, tokens[None], pos[None], seg[None])[0]
    want = numpy_reference.forward(
        jax.device_get(params), tokens, pos, seg, n_layers=2, n_heads=4, n_kv_heads=n_kv, tie=tie
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_causality_changing_token_t_never_changes_earlier_logits():
    cfg, model, params = make()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 16))
    base = np.asarray(model.apply({"params": params}, tokens))
    for t in (0, 5, 15):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 7) % cfg.vocab_size
        out = np.asarray(model.apply({"params": params}, changed))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert np.abs(out[0, t] - base[0, t]).max() > 1e-4  # the change itself is visible


def test_packed_documents_do_not_see_each_other():
    cfg, model, params = make()
    rng = np.random.default_rng(2)
    doc_a, doc_b, other_a = (rng.integers(0, cfg.vocab_size, n) for n in (6, 10, 6))
    seg = np.array([[1] * 6 + [2] * 10])
    pos = np.array([list(range(6)) + list(range(10))])
    packed = np.asarray(
        model.apply({"params": params}, np.concatenate([doc_a, doc_b])[None], pos, seg)
    )
    packed2 = np.asarray(
        model.apply({"params": params}, np.concatenate([other_a, doc_b])[None], pos, seg)
    )
    alone = np.asarray(model.apply({"params": params}, doc_b[None]))
    np.testing.assert_allclose(packed[0, 6:], alone[0], atol=1e-5)
    np.testing.assert_allclose(packed2[0, 6:], alone[0], atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_logits():
    cfg, model, params = make(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    assert out.dtype == jnp.float32
    _, model32, _ = make(dtype="float32")
    ref = model32.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.1)


def test_bf16_matmuls_with_float32_activations_match_numpy_and_float32_grads():
    """The CPU fast mix (model.matmul_dtype=bfloat16): logits near the float64 reference, and
    gradients through the bf16 custom VJP near the float32 model's."""
    cfg, model, params = make(matmul_dtype="bfloat16")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 16))
    pos = np.tile(np.arange(16), (2, 1))
    seg = np.ones((2, 16), np.int32)
    got = model.apply({"params": params}, tokens, pos, seg)
    want = numpy_reference.forward(
        jax.device_get(params), tokens[0], pos[0], seg[0], n_layers=2, n_heads=4, n_kv_heads=2
    )
    scale = np.abs(want).max()
    assert np.abs(np.asarray(got[0]) - want).max() < 2e-2 * scale  # bf16 operands: ~3 digits
    assert np.abs(np.asarray(got[0]) - want).max() > 1e-6 * scale  # really rounded to bf16

    _, model32, _ = make()

    def loss(m):
        def f(p):
            logits = m.apply({"params": p}, tokens, pos, seg)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return f

    g16 = jax.grad(loss(model))(params)
    g32 = jax.grad(loss(model32))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert rel < 3e-2, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("tie,qkv_bias", [(False, False), (True, True)])
def test_param_count_formula_matches_initialised_model(tie, qkv_bias):
    cfg = ModelConfig(
        vocab_size=300,
        d_model=64,
        n_layers=3,
        n_heads=8,
        n_kv_heads=2,
        d_ff=160,
        tie_embeddings=tie,
        qkv_bias=qkv_bias,
    )
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
    assert n == cfg.param_count()


def test_every_param_has_logical_axis_names():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48)
    boxed = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    )
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(
        isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves
    )
