"""Batched generation with a KV cache: left-padded prompts, greedy/temperature/top-k/top-p.

Prompts of different lengths are left-padded (segment 0, never attended) so every row writes the
same cache slot at each decode step; positions count real tokens only, so a row's result does not
depend on how much padding its batch needed. Prefill and the whole decode loop are one jitted
function (``lax.while_loop``), which stops early once every row has produced EOS.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.model.transformer import init_cache


def sample_logits(logits_BV, rng, temperature: float, top_k: int, top_p: float):
    """Next token ids (B,) from float32 logits; temperature 0 means greedy."""
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / temperature
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _generate(model, params, tokens_BP, seg_BP, rng, max_new: int, temperature: float, top_k: int,
              top_p: float, eos_id: int):
    cfg = model.cfg
    B, P = tokens_BP.shape
    positions = jnp.maximum(jnp.cumsum(seg_BP, axis=1) - 1, 0).astype(jnp.int32)
    lengths = seg_BP.sum(axis=1).astype(jnp.int32)
    cache = init_cache(cfg, B, P + max_new)
    logits, cache = model.apply({"params": params}, tokens_BP, positions, seg_BP, kv_cache=cache, cache_offset=0)
    last = logits[:, -1]
    out = jnp.zeros((B, max_new), jnp.int32)
    out_logits = jnp.zeros((B, max_new, cfg.vocab_size), jnp.float32)
    done = jnp.zeros((B,), bool)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, last, cache, out, done, rng, out_logits = carry
        rng, sub = jax.random.split(rng)
        tok = sample_logits(last, sub, temperature, top_k, top_p)
        tok = jnp.where(done, eos_id, tok)
        out = out.at[:, t].set(tok)
        out_logits = out_logits.at[:, t].set(last)
        done = done | (tok == eos_id)
        pos = (lengths + t)[:, None]
        seg = jnp.ones((B, 1), jnp.int32)
        logits, cache = model.apply({"params": params}, tok[:, None], pos, seg, kv_cache=cache, cache_offset=P + t)
        return t + 1, logits[:, -1], cache, out, done, rng, out_logits

    carry = (jnp.int32(0), last, cache, out, done, rng, out_logits)
    t, _, _, out, done, _, out_logits = jax.lax.while_loop(cond, body, carry)
    return out, out_logits, t


def generate(
    model,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    return_logits: bool = False,
):
    """Returns, per prompt, the generated ids (up to and excluding EOS)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    seg = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        seg[i, P - len(p):] = 1
    out, logits, steps = _generate(
        model, params, jnp.asarray(tokens), jnp.asarray(seg), jax.random.PRNGKey(seed),
        int(max_new_tokens), float(temperature), int(top_k), float(top_p), int(eos_id),
    )
    out = np.asarray(out)[:, : int(steps)]
    results = []
    for row in out:
        ids = row.tolist()
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        results.append(ids)
    if return_logits:
        return results, np.asarray(logits)[:, : int(steps)]
    return results
