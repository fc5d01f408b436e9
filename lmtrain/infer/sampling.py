"""Batched generation with a KV cache: left-padded prompts, greedy/temperature/top-k/top-p, stops.

Prompts of different lengths are left-padded (segment 0, never attended) so every row writes the
same cache slot at each decode step; positions count real tokens only, so a row's result does not
depend on how much padding its batch needed. Two jitted functions do the work: ``prefill`` runs
the prompts through the model once and fills the cache; ``decode`` is one ``lax.while_loop`` that
samples a token, checks EOS and stop sequences, and feeds the token back, stopping early once
every row is finished. Keeping them apart lets us time the first token separately (``timing``).

With a ``mesh``, params are placed with the training shardings (from the params' logical axis
names), the batch is split over (data, fsdp) and the cache's kv heads over ``tensor``, so a model
that needed sharding to train can also generate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.errors import LmtrainError
from lmtrain.model.sharding import (
    LOGICAL_RULES,
    batch_sharding,
    data_shards,
    fit_spec,
    logical_shardings,
    mesh_platform,
    mesh_rules,
)
from lmtrain.model.transformer import init_cache

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = 0, 1, 2
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_EOS: "eos", FINISH_STOP: "stop"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to sample: the static argument of the jitted decode (hashable, compared by value).

    ``eos_id=-1`` disables EOS (fixed-length decoding, for benchmarks); ``temperature`` 0 is
    greedy, ``top_k`` 0 and ``top_p`` 1 are off. ``stop_sequences`` end a row (token ids;
    output excludes them). ``return_logits``: keep the float32 logits of every sampled token.
    ``past_context``: outputs may run past the model's context, the window then slides (see
    :func:`generate`).
    """

    max_new_tokens: int
    eos_id: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    return_logits: bool = False
    past_context: bool = False

    def __post_init__(self):
        # Normalised types: equal settings must hash equal, or the decode compiles again.
        norm = {
            "max_new_tokens": int(self.max_new_tokens),
            "eos_id": int(self.eos_id),
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            "top_p": float(self.top_p),
            "stop_sequences": tuple(tuple(int(t) for t in s) for s in self.stop_sequences),
            "return_logits": bool(self.return_logits),
            "past_context": bool(self.past_context),
        }
        for name, value in norm.items():
            object.__setattr__(self, name, value)
        if self.max_new_tokens < 1:
            raise LmtrainError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not (0.0 < self.top_p <= 1.0):
            raise LmtrainError(
                f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}"
            )
        if any(len(s) == 0 for s in self.stop_sequences):
            raise LmtrainError("stop sequences must be non-empty token lists")


@dataclasses.dataclass
class Generation:
    """What ``generate`` returns, one entry per prompt.

    ``tokens`` exclude EOS and a matched stop sequence; ``finish_reasons`` are ``"eos"``,
    ``"stop"`` or ``"length"`` (hit ``max_new_tokens``); ``logits`` (B, steps, V) are the float32
    logits each sampled token was drawn from (only with ``return_logits``); ``timing`` has
    ``prefill_s`` (≈ time to first token), ``decode_s`` and ``steps``.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    logits: np.ndarray | None
    timing: dict[str, float]


def filter_logits(logits_BV, top_k: int, top_p: float):
    """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
    logits = logits_BV
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.maximum(jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1, 0)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(logits_BV, rng, temperature: float, top_k: int, top_p: float):
    """Next token ids (B,) from float32 logits; temperature 0 means greedy."""
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BV / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits_BV, rng, temperature_B, top_k_B, top_p_B):
    """Next token ids (B,) with each row's own temperature/top-k/top-p (arrays, not static).

    For a batch of requests with different settings in one program (``lmtrain serve``); the
    nucleus is taken over the temperature-scaled distribution before the top-k cut, so with both
    filters on it can keep a different set than :func:`filter_logits`.
    """
    V = logits_BV.shape[-1]
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    kth_idx = jnp.clip(top_k_B - 1, 0, V - 1)[:, None]
    kth = jnp.where(
        top_k_B[:, None] > 0, jnp.take_along_axis(sorted_desc, kth_idx, axis=-1), -jnp.inf
    )
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    cut_idx = jnp.sum(cum - probs < top_p_B[:, None], axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_desc, jnp.clip(cut_idx, 0, V - 1), axis=-1)
    keep = logits >= jnp.maximum(kth, cutoff)
    sampled = jax.random.categorical(rng, jnp.where(keep, logits, -jnp.inf), axis=-1).astype(
        jnp.int32
    )
    return jnp.where(temperature_B > 0, sampled, greedy)


def left_pad(rows: Sequence[Sequence[int]], batch: int, length: int, pad_id: int):
    """(tokens, segment ids), both (batch, length) int32: each row right-aligned, segment 1 on
    its tokens and 0 on the padding (never attended); rows past ``len(rows)`` stay all padding."""
    tokens = np.full((batch, length), pad_id, np.int32)
    seg = np.zeros((batch, length), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, length - len(ids) :] = ids
        seg[i, length - len(ids) :] = 1
    return tokens, seg


def prefill_apply(model, params, tokens_BP, seg_BP, cache):
    """The prompts through the model once, filling ``cache``: (logits (B, P, V), cache).
    Positions count real tokens only, so a row's result does not depend on its padding."""
    positions = jnp.maximum(jnp.cumsum(seg_BP, axis=1) - 1, 0).astype(jnp.int32)
    return model.apply(
        {"params": params}, tokens_BP, positions, seg_BP, kv_cache=cache, cache_offset=0
    )


def step_apply(model, params, tok_B, pos_B, cache, offset):
    """One decode step: token ``tok_B`` at position ``pos_B`` into cache slot ``offset``;
    (the next logits (B, V), cache)."""
    seg = jnp.ones((tok_B.shape[0], 1), jnp.int32)
    logits, cache = model.apply(
        {"params": params}, tok_B[:, None], pos_B[:, None], seg, kv_cache=cache, cache_offset=offset
    )
    return logits[:, -1], cache


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _prefill(model, params, tokens_BP, seg_BP, cache_len: int, cache_sharding):
    cache = init_cache(model.cfg, tokens_BP.shape[0], cache_len)
    cache = jax.tree.map(lambda c: _constrain(c, cache_sharding if c.ndim == 4 else None), cache)
    logits, cache = prefill_apply(model, params, tokens_BP, seg_BP, cache)
    return logits[:, -1], cache


def _stop_table(stops: tuple[tuple[int, ...], ...]):
    """(S, L) right-aligned stop ids, -1 = wildcard; lengths (S,)."""
    width = max(len(s) for s in stops)
    table = np.full((len(stops), width), -1, np.int32)
    for i, s in enumerate(stops):
        table[i, width - len(s) :] = s
    return jnp.asarray(table), jnp.asarray([len(s) for s in stops], jnp.int32)


def _decode_impl(model, params, last_BV, cache, lengths_B, rng, prompt_len: int,
                 sp: SamplingParams):  # fmt: skip
    B, max_new, stops = last_BV.shape[0], sp.max_new_tokens, sp.stop_sequences
    out = jnp.zeros((B, max_new), jnp.int32)
    out_logits = jnp.zeros((B, max_new if sp.return_logits else 0, last_BV.shape[-1]), jnp.float32)
    keep = jnp.full((B,), max_new, jnp.int32)  # tokens to return per row
    reason = jnp.full((B,), FINISH_LENGTH, jnp.int32)
    done = jnp.zeros((B,), bool)
    if stops:
        stop_ids, stop_lens = _stop_table(stops)
        recent = jnp.full((B, stop_ids.shape[1]), -2, jnp.int32)  # last generated ids
    else:
        recent = jnp.zeros((B, 0), jnp.int32)

    def cond(carry):
        t, done = carry[0], carry[4]
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, last, cache, out, done, rng, out_logits, keep, reason, recent = carry
        rng, sub = jax.random.split(rng)
        tok = sample_logits(last, sub, sp.temperature, sp.top_k, sp.top_p)
        out = out.at[:, t].set(tok)
        if sp.return_logits:
            out_logits = out_logits.at[:, t].set(last)
        hit_eos = (tok == sp.eos_id) & ~done
        keep = jnp.where(hit_eos, t, keep)
        reason = jnp.where(hit_eos, FINISH_EOS, reason)
        finished = done | hit_eos
        if stops:
            recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
            match = jnp.all((recent[:, None, :] == stop_ids) | (stop_ids < 0), axis=-1)  # (B,S)
            longest = jnp.max(jnp.where(match, stop_lens, 0), axis=-1)
            hit_stop = (longest > 0) & ~finished
            keep = jnp.where(hit_stop, t + 1 - longest, keep)
            reason = jnp.where(hit_stop, FINISH_STOP, reason)
            finished = finished | hit_stop
        logits, cache = step_apply(model, params, tok, lengths_B + t, cache, prompt_len + t)
        return t + 1, logits, cache, out, finished, rng, out_logits, keep, reason, recent

    carry = (jnp.int32(0), last_BV, cache, out, done, rng, out_logits, keep, reason, recent)
    t, _, _, out, done, _, out_logits, keep, reason, _ = jax.lax.while_loop(cond, body, carry)
    keep = jnp.where(done, keep, t)
    return out, out_logits, t, keep, reason


_DECODE_STATIC = (0, 6, 7)  # model, prompt_len, SamplingParams
_decode = jax.jit(_decode_impl, static_argnums=_DECODE_STATIC)
# Donating the cache lets XLA update it in place; the CPU backend cannot use donations (and warns).
_decode_donating = jax.jit(_decode_impl, static_argnums=_DECODE_STATIC, donate_argnums=(3,))


def params_shardings(model, mesh: Mesh):
    """The training shardings of ``model``'s params on ``mesh`` (from their logical axis names)."""
    # Traced with the xla core: same params, and the TPU kernels cannot tile a 1-token sequence.
    plain = type(model)(dataclasses.replace(model.cfg, attention="xla"))
    boxed = jax.eval_shape(
        lambda: plain.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    return logical_shardings(boxed, mesh, LOGICAL_RULES)


def shard_params(model, params, mesh: Mesh):
    """Place ``params`` on ``mesh`` exactly as training shards them."""
    return jax.device_put(params, params_shardings(model, mesh))


def _cache_sharding(model, mesh: Mesh, batch: int, cache_len: int) -> NamedSharding:
    cfg = model.cfg
    spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    shape = (batch, cache_len, cfg.n_kv_heads, cfg.kv_dim)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def generate(
    model,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    seed: int = 0,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    batch_multiple: int = 1,
    prompt_len_multiple: int = 1,
    compile_only: bool = False,
) -> Generation | dict:
    """Generate up to ``sampling.max_new_tokens`` per prompt (a batch; one prompt is a batch of
    one); a row ends at EOS or a stop sequence.

    With ``mesh``, ``params`` should already be placed by ``shard_params`` (host arrays are
    placed here, once per call). ``batch_multiple`` / ``prompt_len_multiple`` round the padded
    batch shape up so that many calls with varied prompts reuse a few compiled shapes (padding
    never changes results). ``compile_only``: compile the prefill and decode programs this call
    would run and return them (``{"prefill": Compiled, "decode": Compiled}``) instead of a
    Generation; ``params`` may then be abstract (``jax.ShapeDtypeStruct``), and a later call
    with the real params finds the programs in JAX's cache (the training loop compiles its
    sample ahead).

    ``sampling.past_context``: outputs may be longer than the model's context
    (``cfg.max_seq_len``). Past it RoPE positions were never trained and the text degenerates,
    so the window slides: each round continues every row from its last ``max_seq_len // 2``
    tokens and fills the rest of the context (nanoGPT's sampler crops its context the same way,
    one token at a time). Every round has the same shapes, so it compiles once. A row ends at
    EOS or a stop sequence (matched within a round; ``truncate_at_stop`` on the text catches
    one that spans two). ``timing``: ``prefill_s`` of the first round, the rest counted as
    decode. Within the context it is the plain call.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmtrainError("every prompt needs at least one token (e.g. BOS); got an empty prompt")
    window = dataclasses.replace(sampling, past_context=False)  # one compile key either way
    shape = dict(pad_id=pad_id, mesh=mesh, batch_multiple=batch_multiple)
    ctx = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if not sampling.past_context or ctx < 2 or longest + sampling.max_new_tokens <= ctx:
        return _generate_window(model, params, prompts, window, seed, compile_only=compile_only,
                                prompt_len_multiple=prompt_len_multiple, **shape)  # fmt: skip
    if sampling.return_logits:
        raise LmtrainError(
            f"return_logits needs prompt + max_new_tokens within the model's context ({ctx})"
        )
    keep = ctx // 2
    window = dataclasses.replace(window, max_new_tokens=ctx - keep)
    if compile_only:  # every round has the first round's shapes
        return _generate_window(model, params, [list(p)[-keep:] for p in prompts], window, seed,
                                compile_only=True, prompt_len_multiple=keep, **shape)  # fmt: skip
    return _slide(model, params, prompts, window, seed, sampling.max_new_tokens, keep, shape)


def _slide(model, params, prompts, window: SamplingParams, seed: int, max_new: int, keep: int,
           shape: dict) -> Generation:  # fmt: skip
    """:func:`generate` past the context: rounds of ``window`` from each row's last ``keep``."""
    step = window.max_new_tokens
    texts = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0}
    live = list(range(len(prompts)))
    for r in range(-(-max_new // step)):
        if not live:
            break
        windows = [(texts[i] + outs[i])[-keep:] for i in live]
        g = _generate_window(model, params, windows, window, seed + r, prompt_len_multiple=keep,
                             **shape)  # fmt: skip
        if r == 0:
            timing["prefill_s"] = g.timing["prefill_s"]
        else:
            timing["decode_s"] += g.timing["prefill_s"]
        timing["decode_s"] += g.timing["decode_s"]
        timing["steps"] += g.timing["steps"]
        still = []
        for i, toks, why in zip(live, g.tokens, g.finish_reasons):
            outs[i].extend(toks)
            reasons[i] = why
            if why == "length" and len(outs[i]) < max_new:  # else EOS, a stop or done
                still.append(i)
        live = still
    return Generation([o[:max_new] for o in outs], reasons, None, timing)


def _generate_window(model, params, prompts, sp: SamplingParams, seed: int, *, pad_id: int,
                     mesh: Mesh | None, batch_multiple: int, prompt_len_multiple: int,
                     compile_only: bool = False) -> Generation | dict:  # fmt: skip
    """One prefill and one decode loop over the left-padded batch (prompt + output in context)."""
    n = len(prompts)
    rows = list(prompts)
    multiple = max(1, batch_multiple)
    if mesh is not None:  # the batch axis must divide over the data shards
        multiple = np.lcm(multiple, data_shards(mesh))
    rows += [rows[-1]] * (-n % multiple)  # extra rows repeat a prompt; their output is dropped
    B, P = len(rows), max(len(p) for p in rows)
    P += -P % max(1, prompt_len_multiple)
    tokens, seg = left_pad(rows, B, P, pad_id)
    lengths = seg.sum(axis=1).astype(np.int32)
    cache_len = P + sp.max_new_tokens
    args = (tokens, seg, lengths, jax.random.PRNGKey(seed))
    cache_sharding = None
    if mesh is not None:
        params, args = _place(model, params, args, mesh, compile_only)
        cache_sharding = _cache_sharding(model, mesh, B, cache_len)
    tokens, seg, lengths, rng = args
    with mesh_rules(mesh) if mesh is not None else contextlib.nullcontext():
        if compile_only:
            return _compile_generation(model, params, tokens, seg, lengths, rng, cache_len,
                                       cache_sharding, P, sp)  # fmt: skip
        t0 = time.perf_counter()
        last, cache = _prefill(model, params, tokens, seg, cache_len, cache_sharding)
        last = jax.block_until_ready(last)
        t1 = time.perf_counter()
        out, logits, steps, keep, reason = _decode_for(mesh)(
            model, params, last, cache, lengths, rng, P, sp
        )
        out = np.asarray(out)
        t2 = time.perf_counter()
    steps, keep, reason = int(steps), np.asarray(keep), np.asarray(reason)
    results = [out[i, : keep[i]].tolist() for i in range(n)]
    reasons = [FINISH_NAMES[int(r)] for r in reason[:n]]
    logits_np = np.asarray(logits)[:n, :steps] if sp.return_logits else None
    timing = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps}
    return Generation(results, reasons, logits_np, timing)


def _place(model, params, args: tuple, mesh: Mesh, compile_only: bool):
    """Params and (tokens, seg, lengths, rng) on ``mesh``: the batch split over (data, fsdp),
    the rng replicated; ``compile_only``: shapes with shardings (the mesh may hold a topology's
    abstract devices), the params' the ones ``shard_params`` would give."""

    def place(x, sharding):
        if compile_only:
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding)
        return jax.device_put(x, sharding)

    *batch, rng = args
    placed = [place(x, batch_sharding(mesh, x.ndim)) for x in batch]
    placed.append(place(rng, NamedSharding(mesh, PartitionSpec())))
    if compile_only:
        params = jax.tree.map(
            lambda p, sh: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sh),
            params,
            params_shardings(model, mesh),
        )
    elif not _is_on_mesh(params, mesh):
        params = shard_params(model, params, mesh)
    return params, tuple(placed)


def _compile_generation(model, params, tokens, seg, lengths, rng, cache_len, cache_sharding, P,
                        sp: SamplingParams):  # fmt: skip
    """Lower and compile ``generate``'s prefill and decode for these arguments."""
    lowered = _prefill.lower(model, params, tokens, seg, cache_len, cache_sharding)
    compiled = lowered.compile()
    # The outputs decode receives: on a mesh with their NamedShardings; on one device the real
    # call's committed single-device arrays key the cache like unplaced ones.
    last, cache = jax.tree.map(
        lambda o, sh: jax.ShapeDtypeStruct(
            o.shape, o.dtype, sharding=sh if isinstance(sh, NamedSharding) else None
        ),
        lowered.out_info,
        compiled.output_shardings,
    )
    decode = _decode_for(cache_sharding.mesh if cache_sharding is not None else None)
    return {
        "prefill": compiled,
        "decode": decode.lower(model, params, last, cache, lengths, rng, P, sp).compile(),
    }


def _decode_for(mesh: Mesh | None):
    """The decode program: donating its cache except on CPU (which cannot use donations)."""
    platform = mesh_platform(mesh) if mesh is not None else jax.default_backend()
    return _decode if platform == "cpu" else _decode_donating


def _is_on_mesh(params, mesh: Mesh) -> bool:
    leaves = jax.tree.leaves(params)
    return all(
        isinstance(x, jax.Array)
        and isinstance(x.sharding, NamedSharding)
        and x.sharding.mesh == mesh
        for x in leaves
    )


def stop_token_ids(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The stop strings as token sequences for the decode loop (empty encodings dropped)."""
    return tuple(tuple(ids) for ids in (tokenizer.encode(s) for s in stop_strings if s) if ids)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def decode_completions(
    tokenizer, g: Generation, stop_strings: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Completions as text and their finish reasons.

    Stop strings are matched twice: as token sequences inside the decode loop (so rows stop
    early, :func:`stop_token_ids`) and here on the decoded text (the ground truth, since a
    tokenizer may split a stop string differently in context). Completions exclude the stop.
    """
    texts, reasons = [], []
    for toks, reason in zip(g.tokens, g.finish_reasons):
        text, hit = truncate_at_stop(tokenizer.decode(toks), stop_strings)
        texts.append(text)
        reasons.append("stop" if hit else reason)
    return texts, reasons
