"""LoRA params transform: exact identity at init, parameter count, merge, adapter files."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.model import lora
from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer
from lmtrain.train import lora_io

CFG = ModelConfig(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    max_seq_len=32,
    dtype="float32",
)


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CFG)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, CFG.vocab_size)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    return model, params, tokens


def random_adapters(params, rank, targets, seed=3):
    """Adapters with non-zero ``b`` (a trained adapter), so merging changes the model."""
    ad = lora.init_adapters(params, rank, targets, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), ad)


def test_zero_init_b_reproduces_base_logits_exactly(model_and_params):
    model, params, tokens = model_and_params
    ad = lora.init_adapters(params, 4, ("all",), jax.random.PRNGKey(2))
    assert all(
        float(jnp.abs(k["b"]).max()) == 0.0
        for layer in ad.values()
        for mod in layer.values()
        for k in mod.values()
    )
    assert float(jnp.abs(ad["layers_0"]["attn"]["q_kernel"]["a"]).max()) > 0  # a is random
    full = lora.apply_adapters(params, ad, scale=16.0 / 4)
    np.testing.assert_array_equal(
        model.apply({"params": full}, tokens), model.apply({"params": params}, tokens)
    )


@pytest.mark.parametrize("rank,targets", [(4, ("q", "v")), (2, ("all",)), (3, ("o", "down", "up"))])
def test_trainable_count_matches_formula(model_and_params, rank, targets):
    _, params, _ = model_and_params
    ad = lora.init_adapters(params, rank, targets, jax.random.PRNGKey(0))
    n = sum(x.size for x in jax.tree.leaves(ad))
    # Independent closed form: r * (fan_in + fan_out) per kernel, from the config's dimensions.
    d, hd, f = CFG.d_model, CFG.d_model // CFG.n_heads, CFG.d_ff
    per = {
        "q": d + 4 * hd,
        "k": d + 2 * hd,
        "v": d + 2 * hd,
        "o": 4 * hd + d,
        "gate": d + f,
        "up": d + f,
        "down": f + d,
    }
    names = lora.resolve_targets(targets)
    assert n == CFG.n_layers * rank * sum(per[t] for t in names)
    assert n == lora.trainable_count(CFG, rank, targets)
    assert n < 0.2 * sum(x.size for x in jax.tree.leaves(params))


def test_delta_is_a_times_b_in_kernel_layout(model_and_params):
    _, params, _ = model_and_params
    ad = random_adapters(params, 3, ("all",))
    full = lora.apply_adapters(params, ad, scale=2.0)
    o = ad["layers_1"]["attn"]["o_kernel"]
    want = np.asarray(params["layers_1"]["attn"]["o_kernel"]) + 2.0 * np.einsum(
        "hdr,re->hde", np.asarray(o["a"]), np.asarray(o["b"])
    )
    np.testing.assert_allclose(full["layers_1"]["attn"]["o_kernel"], want, rtol=1e-5, atol=1e-6)
    q = ad["layers_0"]["attn"]["q_kernel"]
    want = np.asarray(params["layers_0"]["attn"]["q_kernel"]) + 2.0 * np.einsum(
        "dr,rhe->dhe", np.asarray(q["a"]), np.asarray(q["b"])
    )
    np.testing.assert_allclose(full["layers_0"]["attn"]["q_kernel"], want, rtol=1e-5, atol=1e-6)
    # Untargeted leaves are the base's own arrays.
    assert full["embedding"] is params["embedding"]


def test_merged_weights_give_adapter_logits(model_and_params):
    model, params, tokens = model_and_params
    ad = random_adapters(params, 4, ("q", "k", "v", "o", "gate"))
    combined = lora.combine(params, ad, alpha=8.0)
    assert lora.has_lora(combined) and not lora.has_lora(params)
    merged = lora.merge(combined)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    with_adapters = model.apply({"params": lora.apply_adapters(params, ad, 8.0 / 4)}, tokens)
    base = model.apply({"params": params}, tokens)
    assert float(jnp.abs(with_adapters - base).max()) > 1e-3  # the adapters do something
    np.testing.assert_allclose(
        model.apply({"params": merged}, tokens), with_adapters, rtol=1e-5, atol=1e-5
    )
    base2, lo = lora.split_adapters(combined)
    assert jax.tree.structure(base2) == jax.tree.structure(params)
    assert float(lo["alpha"]) == 8.0 and lora.merge(params) == dict(params)


def test_dropout_drops_adapter_input_features(model_and_params):
    _, params, _ = model_and_params
    ad = random_adapters(params, 2, ("q",))
    full = lora.apply_adapters(params, ad, 1.0, dropout=0.5, rng=jax.random.PRNGKey(0))
    d = np.asarray(full["layers_0"]["attn"]["q_kernel"] - params["layers_0"]["attn"]["q_kernel"])
    dropped = np.all(d == 0, axis=(1, 2))
    assert 0 < dropped.sum() < CFG.d_model  # some input rows lose their delta, not all
    a, b = (np.asarray(ad["layers_0"]["attn"]["q_kernel"][k]) for k in "ab")
    kept = ~dropped
    np.testing.assert_allclose(
        d[kept], 2.0 * np.einsum("dr,rhe->dhe", a, b)[kept], rtol=1e-5, atol=1e-6
    )


def test_bad_targets_are_config_errors():
    with pytest.raises(ConfigError, match="unknown target 'qq'"):
        lora.resolve_targets(("qq",))
    assert lora.resolve_targets(("mlp", "q")) == ("q", "gate", "up", "down")


def test_adapters_save_and_load_small_files(tmp_path, model_and_params):
    _, params, _ = model_and_params
    ad = random_adapters(params, 2, ("q", "v"))
    cfg = base_config()
    cfg.lora.update(rank=2, alpha=4.0, targets=("q", "v"))
    path = lora_io.save_adapters(str(tmp_path / "adapters"), ad, cfg, step=7)
    size = (tmp_path / "adapters" / lora_io.WEIGHTS_FILE).stat().st_size
    assert path.endswith(lora_io.WEIGHTS_FILE)
    assert size < 4 * sum(x.size for x in jax.tree.leaves(ad)) + 4096  # adapters only
    back, meta = lora_io.load_adapters(str(tmp_path / "adapters"))
    assert (
        meta["rank"] == 2
        and meta["alpha"] == 4.0
        and meta["targets"] == ["q", "v"]
        and meta["step"] == 7
    )
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(ad))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors not found"):
        lora_io.load_adapters(str(tmp_path / "nothing"))
