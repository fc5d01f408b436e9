"""``lmtrain plan --config <cfg> --devices <kind>:<count>``: will this run fit, and how much work is it?

Everything is computed from shapes, without devices: parameters (from the model's abstract init),
FLOPs per step (lmtrain.train.flops), and per-device bytes for params, optimizer state, gradients
and activations under the config's mesh, logical sharding rules and remat policy.

Params, optimizer state and gradients are exact for the sharding the trainer uses (the same logical
rules and the same "drop a mesh axis that does not divide" fallback). Activations are an estimate:
the residuals each remat policy keeps per layer, plus one layer's working set during the backward
pass and the float32 logits. XLA's real peak differs by fusion and temporaries, so the verdict keeps
a headroom (``USABLE_FRACTION``); tools/bench.py measures the real peak on hardware.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp

from lmtrain.config import load_config
from lmtrain.errors import ConfigError, DoesNotFit
from lmtrain.model.attention_kernels import check_available
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import LOGICAL_RULES, MESH_AXES, fit_spec, resolve_mesh_shape
from lmtrain.model.transformer import Transformer
from lmtrain.train import flops as flops_lib
from lmtrain.train.config_check import validate

GiB = 1024**3
USABLE_FRACTION = 0.9  # of device memory: the rest is left to the runtime and XLA temporaries


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str
    platform: str  # cpu | gpu | tpu (which attention kernels can run)
    memory_bytes: float
    peak_flops: float  # dense bf16 per device (lmtrain.train.flops.PEAK_FLOPS)


DEVICE_KINDS = {
    "cpu": DeviceKind("cpu", "cpu", 16 * GiB, flops_lib.PEAK_FLOPS["cpu"]),
    "h100": DeviceKind("h100", "gpu", 80 * GiB, flops_lib.PEAK_FLOPS["h100"]),
    "h200": DeviceKind("h200", "gpu", 141e9, flops_lib.PEAK_FLOPS["h200"]),
    "a100": DeviceKind("a100", "gpu", 80 * GiB, flops_lib.PEAK_FLOPS["a100"]),
    "tpu-v4": DeviceKind("tpu-v4", "tpu", 32 * GiB, flops_lib.PEAK_FLOPS["tpu v4"]),
    "tpu-v5e": DeviceKind("tpu-v5e", "tpu", 16 * GiB, flops_lib.PEAK_FLOPS["tpu v5e"]),
    "tpu-v5p": DeviceKind("tpu-v5p", "tpu", 95 * GiB, flops_lib.PEAK_FLOPS["tpu v5p"]),
    "tpu-v6e": DeviceKind("tpu-v6e", "tpu", 32 * GiB, flops_lib.PEAK_FLOPS["tpu v6e"]),
}


def parse_devices(text: str) -> tuple[DeviceKind, int]:
    """``h100:8`` → (DeviceKind, 8)."""
    kind, _, count = text.strip().lower().partition(":")
    kind = kind.replace(" ", "-").replace("_", "-")
    if kind not in DEVICE_KINDS:
        raise ConfigError(
            f"--devices {text!r}: unknown device kind {kind!r}; choose one of {sorted(DEVICE_KINDS)}"
        )
    try:
        n = int(count)
    except ValueError:
        raise ConfigError(f"--devices {text!r}: give a count, e.g. {kind}:8") from None
    if n < 1:
        raise ConfigError(f"--devices {text!r}: the count must be positive")
    return DEVICE_KINDS[kind], n


def _dtype_bytes(name: str) -> int:
    return jnp.dtype(name).itemsize


def abstract_params(cfg: ModelConfig):
    """The model's params as logically boxed ShapeDtypeStructs (an init traced, nothing allocated)."""
    import flax.linen as nn  # noqa: F401 (boxing)

    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)["params"]


def sharded_param_elements(boxed_params, mesh_shape: dict[str, int]) -> tuple[int, int]:
    """(total elements, elements on one device) under LOGICAL_RULES on a mesh of these sizes."""
    import flax.linen as nn
    from jax.sharding import PartitionSpec

    mesh = types.SimpleNamespace(shape=mesh_shape)  # fit_spec only reads sizes
    specs = nn.get_partition_spec(boxed_params)
    leaves = nn.meta.unbox(boxed_params)
    total = per_device = 0
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for spec, leaf in zip(spec_leaves, jax.tree.leaves(leaves)):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), LOGICAL_RULES) if spec else PartitionSpec()
        fitted = fit_spec(mesh_spec, leaf.shape, mesh)
        shard = list(leaf.shape)
        for i, entry in enumerate(fitted):
            for name in entry if isinstance(entry, tuple) else ((entry,) if entry else ()):
                shard[i] //= mesh_shape[name]
        total += math.prod(leaf.shape)
        per_device += math.prod(shard)
    return total, per_device


ACTIVATION_PARTS = ("kept", "working_layer", "logits", "head")  # in device memory at once


def activation_bytes(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    tensor: int,
    remat: str,
    attention: str,
    fsdp: int = 1,
) -> dict[str, float]:
    """Estimated per-device activation bytes: kept residuals (all layers) + working set + logits,
    and the LM head's gathered weights and full gradient (``head``)."""
    c = _dtype_bytes(cfg.dtype)
    D, F, H, K, Dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.kv_dim
    bt = batch * seq
    t_heads = tensor if H % tensor == 0 and K % tensor == 0 else 1
    t_mlp = tensor if F % tensor == 0 else 1
    # One layer's matmul weights in the compute dtype, as a chip holds them for its dots: FSDP
    # gathers them whole, the tensor axis keeps them split.
    layer_weights = (D * (2 * H + 2 * K) * Dh / t_heads + 3 * D * F / t_mlp) * c
    qkv = bt * (H + 2 * K) * Dh * c / t_heads
    attn_out = bt * H * Dh * c / t_heads
    block_in = bt * D * c
    # The saved matmul outputs: qkv, o-proj, gate|up. The down projection's output is not among
    # them: its one use is the residual add that makes the block's output, whose backward needs
    # neither operand, and that output is kept once, as the next block's input.
    dots = qkv + bt * D * c + bt * 2 * F * c / t_mlp
    if attention == "xla":  # scores (float32) and probabilities
        scores = batch * (H / t_heads) * seq * seq * (4 + c)
    else:  # fused kernels keep the output and a float32 logsumexp per query
        scores = batch * (H / t_heads) * seq * 4
    # Everything one layer stores for its backward when nothing is recomputed.
    # Of a layer's model-width (D) activations only the block input stays live into the
    # backward: the norm outputs, the attention projection's output and the residual sums are
    # cheap elementwise functions of kept tensors that XLA fuses into their backward consumers
    # (the compiled no-remat steps' totals, with and without a tensor axis, hold one D-wide
    # tensor per layer, not four). Tensor-split activations are all counted.
    full_layer = (
        block_in  # block input
        + qkv * 2  # projections and rotated q, k
        + scores
        + attn_out
        + bt * 3 * F * c / t_mlp  # gate|up and the gated product (the down projection's
    )  # output is not kept: see ``dots``
    kept_per_layer = {
        # Without a policy the matmuls' custom VJPs keep their low-precision operands, weights
        # included: every layer's gathered weights stay live until its backward.
        "none": full_layer + layer_weights,
        "full": block_in,
        "dots": block_in + dots,
        "save_attn_out": block_in + attn_out,
        "save_dots_and_attn_out": block_in + dots + attn_out,
        # The dots get a host copy, yet stay on the chip: XLA:TPU starts the device-to-host
        # copies only after the forward's last layer and the copies back right after them (the
        # order in the compiled step), so every layer's dots live on the chip as under "dots".
        "offload": block_in + dots,
    }
    if remat not in kept_per_layer:
        raise ConfigError(f"config.model.remat={remat!r}: choose one of {sorted(kept_per_layer)}")
    V = cfg.vocab_size
    t_vocab = tensor if V % tensor == 0 else 1
    # The logits, calibrated against compiled steps (docs/performance.md). Without remat: a
    # float32 buffer that the gradient reuses and a compute-dtype one (the 8B step on v5p holds
    # only the float32 one, yet counting only that puts the 1B step on v6e 17% under its
    # compiled total; counting both keeps both within 15%).
    # With a remat policy: two float32 copies, the logits and their gradient (the compiled
    # steps hold a float32 and a compute-dtype buffer, and more of the recomputed layer than
    # the working set itemizes: the 8B full-remat step holds 3.2 GiB more on v6e than on v5p).
    logits = bt * V / t_vocab * ((4 + c) if remat == "none" else 8)
    # The LM head is the largest single weight and its backward runs while the logits' gradient
    # is live: its compute-dtype copy (gathered whole under FSDP) and, under FSDP, its gradient
    # over the whole vocabulary in float32 before the reduce-scatter hands each chip its shard.
    head = D * V / t_vocab * (c + (4 if fsdp > 1 else 0))
    host = dots * cfg.n_layers if remat == "offload" else 0.0
    return {
        "kept": kept_per_layer[remat] * cfg.n_layers,
        "working_layer": 0.0 if remat == "none" else full_layer,
        "logits": logits,
        "head": head,
        "host_offload": host,
    }


def _checked(config, device: DeviceKind, count: int) -> tuple:
    """(a validated copy of the config, the mesh's axis sizes, the model config) for planning
    ``count`` devices of ``device``; the attention kernel is checked for the target platform."""
    cfg = copy.deepcopy(config)
    if cfg.model.vocab_size == 0:
        raise ConfigError(
            "config.model.vocab_size=0 (from the tokenizer): set the vocabulary size to plan"
        )
    attention = cfg.model.attention
    check_available(attention, platform=device.platform, dtype=cfg.model.dtype)
    with cfg.unlocked():
        cfg.model.attention = "xla"  # checked above for the target, not the machine planning it
        if not (cfg.data.dir or cfg.data.path):
            cfg.data.dir = "<planned>"
    validate(cfg, count)
    mesh = dict(zip(MESH_AXES, resolve_mesh_shape(cfg.mesh.shape, count)))
    model_cfg = dataclasses.replace(ModelConfig.from_config(cfg.model), attention=attention)
    return cfg, mesh, model_cfg


def plan(config, device: DeviceKind, count: int) -> dict:
    """The numbers for one config on ``count`` devices of one kind (a JSON-ready dict)."""
    cfg, mesh, model_cfg = _checked(config, device, count)
    attention = model_cfg.attention
    boxed = abstract_params(dataclasses.replace(model_cfg, attention="xla"))  # same params
    n_params, per_device_elems = sharded_param_elements(boxed, mesh)
    p_bytes = _dtype_bytes(model_cfg.param_dtype)
    t = cfg.train
    seq = cfg.data.seq_len
    data_shards = mesh["data"] * mesh["fsdp"]
    micro_batch = t.global_batch_size // data_shards // t.microbatches
    params_b = per_device_elems * p_bytes
    opt_b = 2 * per_device_elems * p_bytes  # AdamW mu and nu, in the params' dtype
    grads_b = per_device_elems * p_bytes
    if t.microbatches > 1:
        grads_b += per_device_elems * 4  # the float32 accumulator of the microbatch scan
    act = activation_bytes(
        model_cfg, micro_batch, seq, mesh["tensor"], model_cfg.remat, attention, mesh["fsdp"]
    )
    act_b = sum(act[k] for k in ACTIVATION_PARTS)
    total = params_b + opt_b + grads_b + act_b
    budget = device.memory_bytes * USABLE_FRACTION
    # What the compiler will report: XLA's rematerialization pass recomputes kept activations
    # when a program's live bytes exceed the chip's memory, until it fits or nothing is left to
    # recompute (about what full remat keeps). The verdict stays on ``total``: a run that only
    # fits by the compiler's own recompute pays for it in step time and sits at the limit.
    act_full = activation_bytes(
        model_cfg, micro_batch, seq, mesh["tensor"], "full", attention, mesh["fsdp"]
    )
    floor = params_b + opt_b + grads_b + sum(act_full[k] for k in ACTIVATION_PARTS)
    compiled = min(total, max(device.memory_bytes, floor))
    tokens = t.global_batch_size * seq
    flops_step = flops_lib.flops_per_token(model_cfg, seq) * tokens
    recompute = {"none": 0.0, "full": 1 / 3}.get(model_cfg.remat, 1 / 6)  # extra forward work
    return {
        "config": {
            "remat": model_cfg.remat,
            "attention": attention,
            "dtype": model_cfg.dtype,
            "seq_len": seq,
            "global_batch": t.global_batch_size,
            "microbatches": t.microbatches,
        },  # fmt: skip
        "devices": {
            "kind": device.name,
            "count": count,
            "memory_gib": device.memory_bytes / GiB,
            "peak_tflops": device.peak_flops / 1e12,
        },  # fmt: skip
        "mesh": mesh,
        "params": n_params,
        "params_closed_form": model_cfg.param_count(),
        "tokens_per_step": tokens,
        "per_device_batch": micro_batch,
        "flops_per_step": flops_step,
        "hardware_flops_per_step": flops_step * (1 + recompute),
        "step_time_s_at_50pct_mfu": flops_step / (0.5 * device.peak_flops * count),
        "per_device_gib": {
            "params": params_b / GiB,
            "optimizer": opt_b / GiB,
            "gradients": grads_b / GiB,
            "activations": act_b / GiB,
            "activations_kept": act["kept"] / GiB,
            "activations_working": (act["working_layer"] + act["logits"] + act["head"]) / GiB,
            "total": total / GiB,
            "compiled_estimate": compiled / GiB,
            "host_offload": act["host_offload"] / GiB,
        },
        "budget_gib": budget / GiB,
        "fits": bool(total <= budget),
    }


def format_plan(p: dict) -> str:
    m = p["per_device_gib"]
    d = p["devices"]
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"devices     {d['count']} x {d['kind']} ({d['memory_gib']:.0f} GiB, "
        f"{d['peak_tflops']:.0f} TFLOP/s bf16 each); mesh {mesh}",
        f"model       {p['params']:,} params | remat {p['config']['remat']} | attention "
        f"{p['config']['attention']} | {p['config']['dtype']}",
        f"batch       {p['config']['global_batch']} x {p['config']['seq_len']} = "
        f"{p['tokens_per_step']:,} tokens/step; {p['per_device_batch']} sequences per device "
        f"per microbatch ({p['config']['microbatches']} microbatches)",
        f"FLOPs/step  {p['flops_per_step']:.3e} model (6N + attention), "
        f"{p['hardware_flops_per_step']:.3e} with recompute; "
        f"{p['step_time_s_at_50pct_mfu']:.2f} s/step at 50% MFU",
        "per device  params {params:.2f} GiB | optimizer {optimizer:.2f} GiB | gradients "
        "{gradients:.2f} GiB | activations {activations:.2f} GiB (kept {activations_kept:.2f}, "
        "working {activations_working:.2f})".format(**m),
        f"total       {m['total']:.2f} GiB of {p['budget_gib']:.1f} GiB usable "
        f"({USABLE_FRACTION:.0%} of {d['memory_gib']:.0f} GiB)"
        + (f"; {m['host_offload']:.2f} GiB offloaded to host" if m["host_offload"] else ""),
        "verdict     " + ("FITS" if p["fits"] else "DOES NOT FIT"),
    ]
    if m["compiled_estimate"] < m["total"] and d["kind"].startswith("tpu"):
        lines.insert(
            -1,
            f"compiler    expect ~{m['compiled_estimate']:.2f} GiB from `lmtrain compile`: XLA "
            "recomputes activations to stay within the chip's memory",
        )
    return "\n".join(lines)


def cmd_plan(args, overrides) -> None:
    cfg = load_config(args.config, overrides)
    device, count = parse_devices(args.devices)
    p = plan(cfg, device, count)
    report = None
    if getattr(args, "compile", None):  # the compiler's numbers beside the estimate
        # lazily: --compile loads libtpu (optional, heavy), and lmtrain.aot imports this module
        from lmtrain.aot.beside_plan import default_topology, side_by_side
        from lmtrain.aot.compile import compile_programs

        topology = args.compile if args.compile != "auto" else default_topology(device.name, count)
        report = compile_programs(cfg, topology, programs=("train_step",))
        p["compiled"] = report
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    if report is not None and not args.json:
        print(side_by_side(p, report))
    if not p["fits"]:
        m = p["per_device_gib"]
        raise DoesNotFit(
            f"{args.config} does not fit on {count} x {device.name}: {m['total']:.2f} GiB per "
            f"device of {p['budget_gib']:.1f} GiB usable (shard more: more devices, fsdp/tensor "
            "axes, remat, microbatches)"
        )


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="parameters, FLOPs and per-device memory: does it fit?")
    p.add_argument("--config", required=True)
    p.add_argument("--devices", required=True, help="kind:count, e.g. h100:8, tpu-v5p:256")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--compile",
        nargs="?",
        const="auto",
        help="also compile the train step for a TPU topology (e.g. v5p:8x8x4; default: one of "
        "--devices' chip count) and print the compiler's numbers beside the estimate",
    )
    p.set_defaults(fn=cmd_plan)
