"""LoRA as a params transform: frozen base weights plus a trainable low-rank delta.

The model code is unchanged. Each step the adapters are folded into the targeted kernels,
``W' = W + (alpha / r) * A @ B``, and the ordinary Transformer runs on ``W'``; gradients reach
only ``A`` and ``B`` because the base tree is passed to the step as a frozen argument. Only the
adapters live in the train state (and so only they have optimizer state and checkpoints).

Adapter tree layout (mirrors the base tree; only targeted kernels appear)::

    {"layers_0": {"attn": {"q_kernel": {"a": [D, r], "b": [r, H, Dh]},
                           "o_kernel": {"a": [H, Dh, r], "b": [r, D]}},
                  "mlp":  {"gate_kernel": {"a": [D, r], "b": [r, F]},
                           "down_kernel": {"a": [F, r], "b": [r, D]}}}, "layers_1": ...}

``a`` contracts the kernel's input axes (D; ``H, Dh`` for ``o_kernel``), ``b`` expands to its
output axes, so ``tensordot(a, b, 1)`` has the kernel's shape. ``b`` starts at zero, so a fresh
adapter reproduces the base model exactly.

A *combined* tree (what export tools receive) is the base tree plus one top-level key::

    {**base, "lora": {"alpha": f32[], "adapters": <adapter tree>}}

``merge`` folds it back into the plain base layout; ``split_adapters`` separates it.

Dropout: because adapters are merged into weights, dropout zeroes *input features* of the adapter
path (one mask per step, scaled by 1/(1-p)) rather than PEFT's per-token activations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmtrain.errors import ConfigError

# target name → (module, kernel, number of input axes)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "q_kernel", 1),
    "k": ("attn", "k_kernel", 1),
    "v": ("attn", "v_kernel", 1),
    "o": ("attn", "o_kernel", 2),
    "gate": ("mlp", "gate_kernel", 1),
    "up": ("mlp", "up_kernel", 1),
    "down": ("mlp", "down_kernel", 1),
}
TARGET_GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
TARGET_GROUPS["all"] = TARGET_GROUPS["attn"] + TARGET_GROUPS["mlp"]
COMBINED_KEY = "lora"


def resolve_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Expands groups (attn, mlp, all) and checks names; returns targets in canonical order."""
    if isinstance(targets, str):
        targets = (targets,)
    chosen: set[str] = set()
    for t in targets:
        if t in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[t])
        elif t in TARGETS:
            chosen.add(t)
        else:
            raise ConfigError(
                f"config.lora.targets: unknown target {t!r}; use any of {', '.join(TARGETS)} or "
                f"the groups {', '.join(TARGET_GROUPS)}"
            )
    if not chosen:
        raise ConfigError("config.lora.targets is empty; name at least one module, e.g. ('q', 'v')")
    return tuple(t for t in TARGETS if t in chosen)


def _layer_names(params: Mapping) -> list[str]:
    return sorted(
        (k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])
    )


def _unbox(x):
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def init_adapters(base: Mapping, rank: int, targets: Sequence[str], rng: jax.Array) -> dict:
    """Fresh adapters for ``base`` (plain or logically boxed): ``a`` ~ N(0, 1/fan_in), ``b`` = 0.

    Boxed kernels give boxed adapters carrying the kernel's logical axis names (``a`` keeps the
    input axes, ``b`` the output axes; the rank axis is replicated), so they shard like the base.
    """
    if rank < 1:
        raise ConfigError(f"config.lora.rank={rank} must be >= 1 to create adapters")
    out: dict = {}
    layers, targets = _layer_names(base), resolve_targets(targets)
    keys = iter(jax.random.split(rng, len(layers) * len(targets)))
    for layer in layers:
        for t in targets:
            module, kernel, n_in = TARGETS[t]
            boxed = base[layer][module][kernel]
            w = _unbox(boxed)
            in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
            fan_in = math.prod(in_shape)
            a = jax.random.normal(next(keys), (*in_shape, rank), w.dtype) * fan_in**-0.5
            b = jnp.zeros((rank, *out_shape), w.dtype)
            if isinstance(boxed, nn.Partitioned):
                names = tuple(boxed.names)
                a = nn.Partitioned(a, names=(*names[:n_in], None))
                b = nn.Partitioned(b, names=(None, *names[n_in:]))
            out.setdefault(layer, {}).setdefault(module, {})[kernel] = {"a": a, "b": b}
    return out


def adapter_rank(adapters: Mapping) -> int:
    leaf = next(iter(_iter_adapters(adapters)))[3]
    return int(_unbox(leaf["a"]).shape[-1])


def _iter_adapters(adapters: Mapping):
    for layer, modules in adapters.items():
        for module, kernels in modules.items():
            for kernel, ab in kernels.items():
                yield layer, module, kernel, ab


def delta(ab: Mapping, scale: float, feature_mask: jax.Array | None = None) -> jax.Array:
    """``scale * a @ b`` in the kernel's layout; ``feature_mask`` drops input features of ``a``."""
    a = ab["a"]
    if feature_mask is not None:
        a = a * feature_mask[..., None]
    return scale * jnp.tensordot(a, ab["b"], axes=1)


def apply_adapters(
    base: Mapping,
    adapters: Mapping,
    scale: float,
    *,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
) -> dict:
    """Base tree with each adapted kernel replaced by ``W + scale * a @ b`` (differentiable)."""
    out = dict(base)  # dicts on the path to a changed kernel are copied below; leaves are shared
    keys = None
    if dropout > 0.0 and rng is not None:
        keys = iter(jax.random.split(rng, sum(1 for _ in _iter_adapters(adapters))))
    for layer, module, kernel, ab in _iter_adapters(adapters):
        if layer not in base or kernel not in base[layer].get(module, {}):
            raise ConfigError(
                f"LoRA adapter {layer}/{module}/{kernel} has no base kernel; the adapters were "
                "made for a different model (check config.model and config.init_from)"
            )
        w = base[layer][module][kernel]
        mask = None
        if keys is not None:
            in_shape = ab["a"].shape[:-1]
            keep = jax.random.bernoulli(next(keys), 1.0 - dropout, in_shape)
            mask = keep.astype(ab["a"].dtype) / (1.0 - dropout)
        new = w + delta(ab, scale, mask).astype(w.dtype)
        out[layer] = dict(out[layer])
        out[layer][module] = dict(out[layer][module])
        out[layer][module][kernel] = new
    return out


def trainable_count(model_cfg, rank: int, targets: Sequence[str]) -> int:
    """Closed form: ``rank * (fan_in + fan_out)`` per adapted kernel, summed over layers."""
    d, h, kv, hd, f = (
        model_cfg.d_model,
        model_cfg.n_heads,
        model_cfg.n_kv_heads,
        model_cfg.kv_dim,
        model_cfg.d_ff,
    )
    sizes = {
        "q": d + h * hd,
        "k": d + kv * hd,
        "v": d + kv * hd,
        "o": h * hd + d,
        "gate": d + f,
        "up": d + f,
        "down": f + d,
    }
    return model_cfg.n_layers * rank * sum(sizes[t] for t in resolve_targets(targets))


# ---- combined trees (the API export tools use) ----


def combine(base: Mapping, adapters: Mapping, alpha: float) -> dict:
    """``{**base, "lora": {"alpha": alpha, "adapters": adapters}}``."""
    return {**base, COMBINED_KEY: {"alpha": jnp.asarray(alpha, jnp.float32), "adapters": adapters}}


def has_lora(params: Mapping) -> bool:
    """True if ``params`` is a combined tree carrying adapters."""
    return isinstance(params, Mapping) and COMBINED_KEY in params


def split_adapters(params: Mapping) -> tuple[dict, dict]:
    """Combined tree → ``(base, {"alpha": ..., "adapters": ...})``; no adapters → ``(params, {})``."""
    if not has_lora(params):
        return dict(params), {}
    base = {k: v for k, v in params.items() if k != COMBINED_KEY}
    return base, dict(params[COMBINED_KEY])


def merge(params: Mapping) -> dict:
    """Folds adapters into plain weights; returns the base tree layout (unchanged if no adapters).

    Works on numpy or jax leaves; the merged kernels keep the base kernels' dtype.
    """
    base, lora = split_adapters(params)
    if not lora:
        return base
    adapters = lora["adapters"]
    scale = float(lora["alpha"]) / adapter_rank(adapters)
    merged = apply_adapters(
        jax.tree.map(jnp.asarray, base), jax.tree.map(jnp.asarray, adapters), scale
    )
    return merged
