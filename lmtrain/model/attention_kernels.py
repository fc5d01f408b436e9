"""Attention cores chosen by ``config.model.attention``: xla, cudnn, splash, flash.

Every implementation computes the same thing: causal attention within packed segments (a query
attends to a key at or before its slot that carries the same non-zero segment id), softmax in
float32, grouped-query heads. They differ in where they run and how much memory they take:

- ``xla``: einsum + mask + softmax, materialises the (T, S) scores. Runs everywhere; the reference
  and the only one used for cached decoding.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``, cuDNN's fused flash kernel on
  NVIDIA GPUs (bf16/fp16). Causality is the kernel's own mask; packed segments are passed as a
  boolean mask (cuDNN adds it as a bias).
- ``splash`` / ``flash``: the Pallas TPU kernels (``jax.experimental.pallas.ops.tpu``), imported
  only when chosen. Both take segment ids natively and skip fully masked blocks. Under a mesh
  they run inside ``shard_map`` (batch over data x fsdp, heads over tensor), since GSPMD cannot
  split a Pallas call.

Queries whose own segment id is 0 (padding) are don't-care rows: the kernels and XLA may return
different values there, and the loss masks them out.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmtrain.errors import ConfigError
from lmtrain.model import matmul
from lmtrain.model.sharding import shard_map

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "flash")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_PALLAS_BLOCK = 512  # largest block (query and key) tried for the TPU kernels

_interpret = contextvars.ContextVar("lmtrain_pallas_interpret", default=False)
_target = contextvars.ContextVar("lmtrain_target_platform", default="")


@contextlib.contextmanager
def target_platform(platform: str):
    """Checks kernels against ``platform`` (e.g. "tpu" while compiling for a TPU topology on a
    CPU host) where no mesh of that platform is in context yet, e.g. in config validation."""
    token = _target.set(platform)
    try:
        yield
    finally:
        _target.reset(token)


def _default_platform() -> str:
    """The compile target: an explicit :func:`target_platform`, else the platform of the mesh in
    context, else this host's default backend."""
    if _target.get():
        return _target.get()
    mesh = _current_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


@contextlib.contextmanager
def interpret_pallas_kernels():
    """Run the TPU kernels (splash, flash) through the Pallas interpreter, e.g. on CPU for tests.

    Splash bakes the mode into its kernel, gradients included. Flash's backward kernels are traced
    after this returns: differentiate flash inside
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` as well.
    """
    token = _interpret.set(True)
    try:
        yield
    finally:
        _interpret.reset(token)


def attention_mask(
    q_slot_T: jax.Array, k_slot_S: jax.Array, q_seg_BT: jax.Array, k_seg_BS: jax.Array
) -> jax.Array:
    """Boolean (B, 1, 1, T, S) mask: causal by slot, same non-zero segment."""
    causal = k_slot_S[None, :] <= q_slot_T[:, None]
    same = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
    return (causal[None] & same)[:, None, None]


def dot_product_attention(
    q_BTKGD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask: jax.Array
) -> jax.Array:
    """Reference XLA attention ('xla'); softmax in float32. Returns (B, T, K, G, D)."""
    scale = q_BTKGD.shape[-1] ** -0.5
    scores = jnp.einsum(
        "btkgd,bskd->bkgts",
        q_BTKGD * jnp.asarray(scale, q_BTKGD.dtype),
        k_BSKD,
        preferred_element_type=jnp.float32,
    )
    scores = jnp.where(mask, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD)


def xla_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, seg_BT: jax.Array):
    """Self-attention over one packed sequence with the XLA reference. Returns (B, T, H, D)."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    slot = jnp.arange(T)
    mask = attention_mask(slot, slot, seg_BT, seg_BT)
    out = dot_product_attention(q_BTHD.reshape(B, T, K, H // K, D), k_BTKD, v_BTKD, mask)
    return out.reshape(B, T, H, D)


def xla_attention_head_major(
    q_BHTD: jax.Array,
    k_BKTD: jax.Array,
    v_BKTD: jax.Array,
    seg_BT: jax.Array,
    matmul_dtype=None,
    custom_grad: bool = True,
) -> jax.Array:
    """The 'xla' core in head-major layout (the training fast path). Returns (B, H, T, D).

    Same maths as :func:`xla_attention`, but with heads before time the batched matmuls need no
    transposes: about a third less CPU time for attention forward + backward at nanoGPT sizes.
    With ``custom_grad`` (no remat policy) the backward is :func:`_attention_core`'s.
    """
    B, H, T, D = q_BHTD.shape
    K = k_BKTD.shape[1]
    slot = jnp.arange(T)
    mask = attention_mask(slot, slot, seg_BT, seg_BT)  # (B, 1, 1, T, T)
    mm = jnp.dtype(matmul_dtype or q_BHTD.dtype)
    if custom_grad:
        q = q_BHTD.reshape(B, K, H // K, T, D)
        out = _attention_core(q, k_BKTD, v_BKTD, mask, mm)
        return out.astype(v_BKTD.dtype).reshape(B, H, T, D)
    q = (q_BHTD * jnp.asarray(D**-0.5, q_BHTD.dtype)).reshape(B, K, H // K, T, D)
    scores = matmul.einsum("bkgtd,bksd->bkgts", q, k_BKTD, mm, custom_grad)
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = matmul.einsum("bkgts,bksd->bkgtd", probs, v_BKTD, mm, custom_grad)
    return out.astype(v_BKTD.dtype).reshape(B, H, T, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q_BKGTD, k_BKSD, v_BKSD, mask, mm_dtype):
    """Softmax attention with a FlashAttention-style backward; float32 out.

    The softmax gradient uses ``rowsum(dO * O)`` (a reduction over the head dim) instead of
    autodiff's ``rowsum(dP * P)`` over the keys, and every matmul takes ``mm_dtype`` operands
    with float32 accumulation (see :mod:`lmtrain.model.matmul`).
    """
    return _attention_core_fwd(q_BKGTD, k_BKSD, v_BKSD, mask, mm_dtype)[0]


def _attention_core_fwd(q, k, v, mask, mm):
    scale = q.shape[-1] ** -0.5
    ql, kl, vl = (q * jnp.asarray(scale, q.dtype)).astype(mm), k.astype(mm), v.astype(mm)
    scores = jnp.einsum("bkgtd,bksd->bkgts", ql, kl, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASK_VALUE), axis=-1)
    pl = probs.astype(mm)
    out = jnp.einsum("bkgts,bksd->bkgtd", pl, vl, preferred_element_type=jnp.float32)
    dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (q, k, v))  # the inputs' own dtypes
    return out, (ql, kl, vl, probs, pl, out, dtypes)


def _attention_core_bwd(mm, res, g):
    ql, kl, vl, probs, pl, out, (q_dt, k_dt, v_dt) = res
    gl = g.astype(mm)
    f32 = jnp.float32
    dv = jnp.einsum("bkgts,bkgtd->bksd", pl, gl, preferred_element_type=f32)
    dp = jnp.einsum("bkgtd,bksd->bkgts", gl, vl, preferred_element_type=f32)
    delta = jnp.sum(g.astype(f32) * out, axis=-1, keepdims=True)  # = rowsum(dP * P)
    ds = (probs * (dp - delta)).astype(mm)  # masked keys have probability 0, so ds is 0 there
    scale = ql.shape[-1] ** -0.5
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, kl, preferred_element_type=f32) * scale
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, ql, preferred_element_type=f32)
    return dq.astype(q_dt.dtype), dk.astype(k_dt.dtype), dv.astype(v_dt.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def cudnn_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, seg_BT: jax.Array):
    """cuDNN fused attention: its causal mask, plus packed segments as a boolean mask."""
    same = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] != 0)
    return jax.nn.dot_product_attention(
        q_BTHD, k_BTKD, v_BTKD, mask=same[:, None], is_causal=True, implementation="cudnn"
    )


def _block(T: int) -> int:
    if T % 128:
        raise ConfigError(
            f"the Pallas TPU attention kernels tile the sequence by 128, but it has {T} tokens; "
            "make config.data.seq_len a multiple of 128 or use config.model.attention=xla"
        )
    b = min(_PALLAS_BLOCK, T)
    while T % b:
        b //= 2
    return b


def _splash_local(q_BTHD, k_BTKD, v_BTKD, seg_BT, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, D = q_BTHD.shape
    b = _block(T)
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(H)])
    kernel = sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    # Splash has no softmax scale argument: scale q as the XLA path does.
    q = (q_BTHD * jnp.asarray(D**-0.5, q_BTHD.dtype)).transpose(0, 2, 1, 3)
    k, v = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)

    def one(q1, k1, v1, s1):
        return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))

    out = jax.vmap(one)(q, k, v, seg_BT)
    return out.transpose(0, 2, 1, 3).astype(q_BTHD.dtype)


def _flash_local(q_BTHD, k_BTKD, v_BTKD, seg_BT, interpret: bool):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    b = _block(T)
    sizes = fa.BlockSizes(
        block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b, block_k_major_dkv=b,
        block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b, block_q_dq=b,
    )  # fmt: skip
    # The flash kernel wants as many kv heads as query heads.
    k = jnp.repeat(k_BTKD, H // K, axis=2).transpose(0, 2, 1, 3)
    v = jnp.repeat(v_BTKD, H // K, axis=2).transpose(0, 2, 1, 3)
    q = q_BTHD.transpose(0, 2, 1, 3)
    ctx = contextlib.nullcontext()
    if interpret:  # flash has no interpret argument: force the TPU interpreter while tracing it
        from jax.experimental.pallas import tpu as pltpu

        ctx = pltpu.force_tpu_interpret_mode()
    with ctx:
        out = fa.flash_attention(
            q, k, v, segment_ids=fa.SegmentIds(q=seg_BT, kv=seg_BT), causal=True,
            sm_scale=D**-0.5, block_sizes=sizes,
        )  # fmt: skip
    return out.transpose(0, 2, 1, 3).astype(q_BTHD.dtype)


def _current_mesh():
    """The mesh of an enclosing ``with mesh:`` block, or None."""
    try:
        from jax._src.mesh import thread_resources

        mesh = thread_resources.env.physical_mesh
    except (ImportError, AttributeError):  # pragma: no cover - future jax
        return None
    return None if mesh.empty else mesh


def _sharded(local_fn, q_BTHD, k_BTKD, v_BTKD, seg_BT, interpret: bool):
    """Runs a Pallas kernel per shard: batch over (data, fsdp), heads over tensor when they divide."""
    fn = functools.partial(local_fn, interpret=interpret)
    mesh = _current_mesh()
    if mesh is None or mesh.size == 1:
        return fn(q_BTHD, k_BTKD, v_BTKD, seg_BT)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    shards = 1
    for a in batch_axes:
        shards *= mesh.shape[a]
    batch = batch_axes if q_BTHD.shape[0] % shards == 0 else None
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if q_BTHD.shape[2] % t == 0 and k_BTKD.shape[2] % t == 0 else None
    qkv_spec = PartitionSpec(batch, None, heads, None)
    seg_spec = PartitionSpec(batch, None)
    return shard_map(
        fn, mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec
    )(q_BTHD, k_BTKD, v_BTKD, seg_BT)


def check_available(implementation: str, platform: str | None = None, dtype: str = "") -> None:
    """Raises ConfigError when ``implementation`` cannot run on ``platform`` (default: the
    compile target, see :func:`_default_platform`)."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(
            f"config.model.attention={implementation!r}: choose one of {IMPLEMENTATIONS}"
        )
    if implementation == "xla":
        return
    if implementation in ("splash", "flash") and _interpret.get():
        return
    platform = platform or _default_platform()
    if implementation == "cudnn":
        if platform not in ("gpu", "cuda"):
            raise ConfigError(
                f"config.model.attention='cudnn' needs an NVIDIA GPU, but the backend is "
                f"{platform!r}; use config.model.attention=xla (or splash on TPU)"
            )
        if dtype and dtype not in ("bfloat16", "float16"):
            raise ConfigError(
                f"config.model.attention='cudnn' runs in bfloat16/float16, not {dtype}; set "
                "config.model.dtype=bfloat16"
            )
        return
    if platform != "tpu":
        raise ConfigError(
            f"config.model.attention={implementation!r} is a Pallas TPU kernel, but the backend "
            f"is {platform!r}; use config.model.attention=xla (or cudnn on NVIDIA GPUs)"
        )


def causal_self_attention(
    implementation: str,
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    seg_BT: jax.Array,
) -> jax.Array:
    """Causal, segment-masked self-attention (T == S, no cache) with the chosen core: (B, T, H, D)."""
    check_available(implementation, dtype=str(q_BTHD.dtype))
    if implementation == "xla":
        return xla_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT)
    if implementation == "cudnn":
        return cudnn_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT)
    local = _splash_local if implementation == "splash" else _flash_local
    return _sharded(local, q_BTHD, k_BTKD, v_BTKD, seg_BT, _interpret.get())
