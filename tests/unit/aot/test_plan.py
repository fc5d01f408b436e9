"""The capacity planner: exact parameter counts and sharded state bytes, FLOPs against XLA's own
count, and a fit / no-fit verdict with numbers for each large config."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import cli, plan
from lmtrain.config import base_config, load_config
from lmtrain.errors import ConfigError
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import flops as flops_lib
from lmtrain.train.optim import make_optimizer
from lmtrain.train.state import init_state

# Published sizes of the Llama 3 checkpoints (Hugging Face model cards / safetensors index).
PUBLISHED = {"llama_1b": 1_235_814_400, "llama_8b": 8_030_261_248, "llama_70b": 70_553_706_496}


def _tiny():
    c = base_config()
    c.data.dir = "unused"
    c.data.seq_len = 32
    c.model.update(
        vocab_size=96,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        d_ff=96,
        max_seq_len=32,
        dtype="float32",
    )
    c.train.global_batch_size = 8
    c.mesh.shape = (2, 2, 2)
    return c


def test_param_count_equals_model_init_and_closed_form():
    c = _tiny()
    p = plan.plan(c, *plan.parse_devices("cpu:8"))
    params = Transformer(ModelConfig.from_config(c.model)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
    )["params"]
    actual = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))
    assert p["params"] == actual == ModelConfig.from_config(c.model).param_count()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llama_configs_have_the_published_sizes(name):
    c = load_config(f"configs/{name}.py")
    m = ModelConfig.from_config(c.model)
    boxed = plan.abstract_params(ModelConfig(**{**m.__dict__, "attention": "xla"}))
    total, _ = plan.sharded_param_elements(boxed, {"data": 1, "fsdp": 1, "tensor": 1})
    assert total == m.param_count() == PUBLISHED[name]


def test_per_device_state_bytes_equal_the_sharded_arrays():
    """params and AdamW moments per device, against real arrays on a (2, 2, 2) mesh of 8 devices
    (n_kv_heads=1 does not divide tensor=2, so the planner must follow the replication fallback)."""
    c = _tiny()
    p = plan.plan(c, *plan.parse_devices("cpu:8"))
    model = Transformer(ModelConfig.from_config(c.model))
    tx, _ = make_optimizer(c.optim, c.train.steps)
    state, _ = init_state(model, tx, 32, 0, make_mesh((2, 2, 2)))
    dev = jax.devices()[0]

    def bytes_on(tree):
        return sum(
            s.data.nbytes
            for x in jax.tree.leaves(tree)
            if x.ndim > 0
            for s in x.addressable_shards
            if s.device == dev
        )

    params_b = bytes_on(state.params)
    assert params_b == pytest.approx(p["per_device_gib"]["params"] * plan.GiB, abs=0.5)
    moments_b = bytes_on(state.opt_state)  # mu and nu (the step counts are scalars)
    assert moments_b == pytest.approx(p["per_device_gib"]["optimizer"] * plan.GiB, abs=0.5)
    full = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert full / 8 < params_b < full  # sharded, but not evenly: the kv heads are replicated


def test_flops_formula_matches_xla_cost_analysis():
    """3 x XLA's forward FLOPs, minus the masked half of the attention matrix XLA computes anyway,
    equals 6N + attention within 3% (the rest is norms, softmax and other elementwise work)."""
    cfg = ModelConfig(
        vocab_size=128,
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        d_ff=512,
        max_seq_len=64,
        dtype="float32",
    )
    B, T = 4, 64
    model = Transformer(cfg)
    tokens = jnp.zeros((B, T), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens))
    # Embedding is a lookup, not a matmul: use the gather path for this count.
    cost = jax.jit(model.apply).lower(params, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    fwd = float(cost["flops"])
    onehot_embed = 2 * B * T * cfg.vocab_size * cfg.d_model  # small-vocab one-hot matmul
    masked_half = 2 * cfg.n_layers * B * cfg.n_heads * cfg.kv_dim * T * T  # (4·L·H·Dh·T²)/2
    expected = flops_lib.flops_per_token(cfg, T) * B * T
    assert 3 * (fwd - onehot_embed - masked_half) == pytest.approx(expected, rel=0.03)


def _run_cli(capsys, *argv, code: int = 0):
    """The plan command's stdout; a config that does not fit exits with code 2 and says so."""
    if code:
        with pytest.raises(SystemExit) as exc:
            cli.main(["plan", *argv])
        assert exc.value.code == code
    else:
        cli.main(["plan", *argv])
    captured = capsys.readouterr()
    if code:
        assert "does not fit on" in captured.err and "GiB per device" in captured.err
    return captured.out


@pytest.mark.parametrize(
    ("name", "devices", "fits"),
    [
        ("llama_1b", "h100:8", True),
        ("llama_8b", "tpu-v5p:256", True),
        ("llama_70b", "h100:2048", True),
        ("llama_70b", "h100:8", False),
    ],
)
def test_large_configs_report_fit_or_no_fit_with_numbers(capsys, name, devices, fits):
    import json

    code = 0 if fits else 2
    out = _run_cli(
        capsys, "--config", f"configs/{name}.py", "--devices", devices, "--json", code=code
    )
    p = json.loads(out)
    m = p["per_device_gib"]
    parts = m["params"] + m["optimizer"] + m["gradients"] + m["activations"]
    assert m["total"] == pytest.approx(parts)
    assert all(m[k] > 0 for k in ("params", "optimizer", "gradients", "activations"))
    assert p["fits"] is fits and p["fits"] == (m["total"] <= p["budget_gib"])
    assert p["params"] == PUBLISHED[name]
    assert p["flops_per_step"] > 6 * p["params"] * p["tokens_per_step"] * 0.9
    text = _run_cli(capsys, "--config", f"configs/{name}.py", "--devices", devices, code=code)
    assert ("DOES NOT FIT" in text) == (not fits)
    assert re.search(r"params [\d.]+ GiB \| optimizer [\d.]+ GiB \| gradients [\d.]+ GiB", text)


def test_more_remat_means_less_activation_memory():
    c = load_config("configs/llama_8b.py")
    dev = plan.parse_devices("tpu-v5p:256")
    acts = {}
    for r in ("none", "dots", "full"):
        with c.unlocked():
            c.model.remat = r
        acts[r] = plan.plan(c, *dev)["per_device_gib"]["activations"]
    assert acts["full"] < acts["dots"] < acts["none"]


def test_bad_devices_and_unavailable_kernels_are_config_errors():
    with pytest.raises(ConfigError, match="unknown device kind 'gpu9'"):
        plan.parse_devices("gpu9:8")
    with pytest.raises(ConfigError, match="give a count"):
        plan.parse_devices("h100")
    c = load_config("configs/llama_8b.py")  # splash attention: TPU only
    with pytest.raises(ConfigError, match="Pallas TPU kernel"):
        plan.plan(c, *plan.parse_devices("h100:256"))
    with pytest.raises(ConfigError, match="mesh"):
        plan.plan(load_config("configs/llama_70b.py"), *plan.parse_devices("h100:12"))


def test_attention_memory_depends_on_the_kernel():
    c = load_config("configs/llama_70b.py")
    dev = plan.parse_devices("h100:2048")
    with c.unlocked():
        c.model.remat = "none"
    fused = plan.plan(c, *dev)["per_device_gib"]["activations"]
    with c.unlocked():
        c.model.attention = "xla"
    assert plan.plan(c, *dev)["per_device_gib"]["activations"] > fused
    np.testing.assert_equal(fused > 0, True)


def test_fsdp_adds_the_lm_heads_gathered_copy_and_float32_gradient():
    """Under FSDP the head is gathered whole in bf16 and its gradient spans the whole vocabulary
    in float32 until the reduce-scatter; without FSDP only the bf16 copy is extra."""
    m = ModelConfig.from_config(load_config("configs/llama_8b.py").model)
    args = (m, 2, 8192, 1, "full", "splash")
    head = m.vocab_size * m.d_model
    assert plan.activation_bytes(*args, fsdp=256)["head"] == head * (2 + 4)
    assert plan.activation_bytes(*args, fsdp=1)["head"] == head * 2


def test_compiler_estimate_is_the_need_or_the_chip_where_xla_recomputes():
    c = load_config("configs/llama_1b.py")
    dev = plan.parse_devices("tpu-v5e:16")
    with c.unlocked():
        c.model.attention = "splash"
        c.model.remat = "none"  # needs more than a v5e's 16 GiB; full remat needs less
    m = plan.plan(c, *dev)["per_device_gib"]
    assert m["total"] > 16 and m["compiled_estimate"] == 16
    with c.unlocked():
        c.model.remat = "full"
    m = plan.plan(c, *dev)["per_device_gib"]
    assert m["total"] < 16 and m["compiled_estimate"] == m["total"]


def test_saved_dots_are_qkv_o_proj_and_gate_up_per_layer():
    """save_dots keeps per layer, beyond full remat's block input, the qkv, o-proj and gate|up
    outputs and the attention output; the down projection's output only feeds the residual add
    whose result is the next block's input, so it is not kept a second time."""
    m = ModelConfig.from_config(load_config("configs/llama_8b.py").model)
    b, t, c = 2, 8192, 2
    full = plan.activation_bytes(m, b, t, 1, "full", "splash")["kept"]
    dots = plan.activation_bytes(m, b, t, 1, "save_dots_and_attn_out", "splash")["kept"]
    D, F, H, K, Dh = m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.kv_dim
    per_layer = b * t * c * ((H + 2 * K) * Dh + D + 2 * F + H * Dh)
    assert dots - full == per_layer * m.n_layers


def test_offload_keeps_the_dots_on_the_chip_and_copies_them_to_the_host():
    """The compiled step schedules the offloaded dots' copies to the host after the forward and
    back at once, so the chip holds what ``dots`` holds and the host a copy of the dots."""
    m = ModelConfig.from_config(load_config("configs/llama_8b.py").model)
    args = (m, 2, 8192, 1)
    off = plan.activation_bytes(*args, "offload", "splash")
    dots = plan.activation_bytes(*args, "dots", "splash")
    full = plan.activation_bytes(*args, "full", "splash")
    assert off["kept"] == dots["kept"]
    assert off["host_offload"] == dots["kept"] - full["kept"]


def test_without_remat_a_layer_keeps_one_model_width_tensor_and_its_split_activations():
    """remat=none: per layer the block input (D wide), q/k/v and their rotated copies, the
    attention output, gate|up and the gated product (split over the tensor axis) and the
    gathered weights; splash keeps a float32 logsumexp per query instead of scores."""
    m = ModelConfig.from_config(load_config("configs/llama_70b.py").model)
    b, t, tp, c = 2, 8192, 8, 2
    D, F, H, K, Dh = m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.kv_dim
    bt = b * t
    per_layer = (
        bt * D * c
        + 2 * bt * (H + 2 * K) * Dh * c / tp
        + b * (H / tp) * t * 4
        + bt * H * Dh * c / tp
        + bt * 3 * F * c / tp
        + (D * (2 * H + 2 * K) * Dh / tp + 3 * D * F / tp) * c
    )
    kept = plan.activation_bytes(m, b, t, tp, "none", "splash")["kept"]
    assert kept == pytest.approx(per_layer * m.n_layers, rel=1e-12)


def test_logits_without_remat_are_a_float32_and_a_compute_dtype_copy():
    """remat=none: a float32 logits buffer (the gradient reuses it) and a bfloat16 one; with a
    remat policy two float32 copies, the logits and their gradient."""
    m = ModelConfig.from_config(load_config("configs/llama_8b.py").model)
    b, t, tp = 2, 8192, 1
    elements = b * t * m.vocab_size
    assert plan.activation_bytes(m, b, t, tp, "none", "splash")["logits"] == elements * (4 + 2)
    for remat in ("full", "save_dots_and_attn_out", "offload"):
        assert plan.activation_bytes(m, b, t, tp, remat, "splash")["logits"] == elements * 8
