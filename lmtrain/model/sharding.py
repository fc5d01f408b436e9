"""Device mesh and the one table that maps logical axis names onto it.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with params and optimizer state
sharded), ``tensor`` (Megatron-style model parallel). The batch is split over (data, fsdp).
We use the classic GSPMD flow (``AxisType.Auto``): shardings are constraints that XLA propagates,
so the model code never places arrays by hand.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.errors import ConfigError, require

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: for a tensor with several logical axes, a mesh axis is used once, by the first
# logical axis whose rule names it (so activations' ``batch`` takes fsdp before ``embed`` could).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("length", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the one ``-1`` axis and checks the product equals the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(
            f"config.mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}"
        )
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh.shape={shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config.mesh.shape={shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh.shape={shape}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} available devices; choose sizes whose product divides {num_devices}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"config.mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are "
            f"available; make the product equal {num_devices} or use -1 for one axis"
        )
    return shape


def check_mesh_section(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """The ``config.mesh`` section over ``num_devices`` available devices; its resolved
    (data, fsdp, tensor) shape."""
    require(
        0 <= mesh_cfg.num_devices <= num_devices,
        f"config.mesh.num_devices={mesh_cfg.num_devices} must be between 0 (all) and the "
        f"{num_devices} available devices",
    )
    return resolve_mesh_shape(mesh_cfg.shape, mesh_cfg.num_devices or num_devices)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, devices=devices, **kwargs)
    except NotImplementedError:
        # A TPU torus whose physical axes do not factor into the mesh's (e.g. tensor 8 on
        # v5p 16x16x16): let an axis of the mesh span part of a physical axis instead of failing.
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, **kwargs)
    except (TypeError, ValueError):
        arr = np.asarray(devices).reshape(shape)
        return Mesh(arr, MESH_AXES, **kwargs)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """The context every jitted model call is traced in: the mesh and the logical rules.

    Flax's ``with_logical_constraint`` applies a constraint only when ``jax.set_mesh`` has set
    the (abstract) mesh; under the legacy ``with mesh:`` alone every activation constraint in
    the model is silently dropped, and the partitioner is free to split activations over the
    model width instead of the batch (FSDP then computes every dot over the global batch).
    ``with mesh`` stays for code that reads the legacy thread-local mesh.
    """
    with mesh, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (e.g. 4 kv heads on 8-way tensor)."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = []
        size = shape[i]
        for n in names:
            if size % mesh.shape[n] == 0:
                kept.append(n)
                size //= mesh.shape[n]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*out)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly logically boxed) abstract arrays."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    unboxed = nn.meta.unbox(abstract_boxed_tree)

    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec else PartitionSpec()
        return NamedSharding(mesh, fit_spec(mesh_spec, leaf.shape, mesh))

    return jax.tree.map(one, specs, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec))


def mesh_platform(mesh: Mesh) -> str:
    """The platform the mesh's devices belong to (the compile target, not necessarily the host:
    an ahead-of-time compile for a TPU topology runs on a CPU host)."""
    return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def data_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.6) or the experimental one, without replication checks."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as sm  # pragma: no cover - jax < 0.6

    return sm(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
