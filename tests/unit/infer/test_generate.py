"""KV-cache generation against full recomputation, padding, sampling filters, stops, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.data.tokenizer import CharTokenizer
from lmtrain.errors import LmtrainError
from lmtrain.infer.sampling import (
    SamplingParams,
    decode_completions,
    filter_logits,
    generate,
    shard_params,
    stop_token_ids,
    truncate_at_stop,
)
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer

VOCAB = 61
NO_EOS = -1


@pytest.fixture(scope="module")
def model_and_params():
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=64,
        dtype="float32",
    )
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(
        np.asarray,
        jax.tree.map(
            lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
        ),
    )
    return model, params


def _gen(model, params, prompts, *, seed=0, mesh=None, batch_multiple=1, prompt_len_multiple=1,
         compile_only=False, **sampling):  # fmt: skip
    """``generate`` with the sampling settings as keywords."""
    return generate(model, params, prompts, SamplingParams(**sampling), seed=seed, mesh=mesh,
                    batch_multiple=batch_multiple, prompt_len_multiple=prompt_len_multiple,
                    compile_only=compile_only)  # fmt: skip


def _tl(g):
    return g.tokens, g.logits


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(4, VOCAB, size=n).tolist() for n in (1, 5, 9)]


def _greedy_by_full_recompute(model, params, prompt, steps):
    """Reference: rerun the whole sequence through the model (no cache) for every new token.

    The sequence is right-padded to one fixed length (causal attention: later slots cannot
    change earlier logits) so the forward compiles once.
    """
    width = 32
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    seq, toks, logits = list(prompt), [], []
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        last = np.asarray(forward(params, jnp.asarray(padded)))[0, len(seq) - 1]
        tok = int(np.argmax(last))
        toks.append(tok)
        logits.append(last)
        seq.append(tok)
    return toks, np.stack(logits)


def test_cached_greedy_matches_full_recomputation(model_and_params):
    model, params = model_and_params
    prompt = _prompts()[2]
    toks, logits = _tl(
        _gen(model, params, [prompt], max_new_tokens=12, eos_id=NO_EOS, return_logits=True)
    )
    ref_toks, ref_logits = _greedy_by_full_recompute(model, params, prompt, 12)
    assert toks[0] == ref_toks
    # Same math in a different order (cache vs full matmuls): float32 rounding only.
    np.testing.assert_allclose(logits[0], ref_logits, rtol=0, atol=2e-5)


def test_batched_left_padded_equals_one_at_a_time(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    batch_toks, batch_logits = _tl(
        _gen(model, params, prompts, max_new_tokens=10, eos_id=NO_EOS, return_logits=True)
    )
    for i, p in enumerate(prompts):
        one_toks, one_logits = _tl(
            _gen(model, params, [p], max_new_tokens=10, eos_id=NO_EOS, return_logits=True)
        )
        assert batch_toks[i] == one_toks[0]
        np.testing.assert_allclose(batch_logits[i], one_logits[0], rtol=0, atol=2e-5)
        ref_toks, _ = _greedy_by_full_recompute(model, params, p, 10)
        assert one_toks[0] == ref_toks
    # Extra padding rows / columns (used to reuse compiled shapes) change nothing.
    padded_toks, padded_logits = _tl(
        _gen(
            model,
            params,
            prompts,
            max_new_tokens=10,
            eos_id=NO_EOS,
            return_logits=True,
            batch_multiple=8,
            prompt_len_multiple=16,
        )
    )
    assert padded_toks == batch_toks
    np.testing.assert_allclose(padded_logits, batch_logits, rtol=0, atol=2e-5)


def test_top_k_1_and_tiny_top_p_equal_greedy(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    greedy = _gen(model, params, prompts, max_new_tokens=8, eos_id=NO_EOS).tokens
    top1 = _gen(
        model, params, prompts, max_new_tokens=8, eos_id=NO_EOS, temperature=1.5, top_k=1, seed=3
    ).tokens
    nucleus = _gen(
        model, params, prompts, max_new_tokens=8, eos_id=NO_EOS, temperature=1.5, top_p=1e-6, seed=4
    ).tokens
    assert top1 == greedy
    assert nucleus == greedy
    sampled = _gen(
        model, params, prompts, max_new_tokens=8, eos_id=NO_EOS, temperature=1.5, seed=5
    ).tokens
    assert sampled != greedy  # plain sampling at T=1.5 does differ (the filters did the work)


def _numpy_filter(logits, top_k, top_p):
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k:
            kth = np.sort(row)[::-1][top_k - 1]
            row[row < kth] = -np.inf
        if top_p < 1:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            mass, keep = 0.0, []
            for idx, pi in zip(order, p):
                keep.append(idx)
                mass += pi
                if mass >= top_p:
                    break
            mask = np.ones_like(row, bool)
            mask[keep] = False
            row[mask] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (1, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(top_k + int(top_p * 10)).normal(size=(4, 33)).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    want = _numpy_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], logits[~np.isinf(want)])


def test_eos_stop_sequence_and_length_cap(model_and_params):
    model, params = model_and_params
    prompt = _prompts()[1]
    full = _gen(model, params, [prompt], max_new_tokens=12, eos_id=NO_EOS).tokens[0]
    # EOS: choose the token at step 4 as "EOS"; output stops before its first occurrence.
    eos = full[4]
    first = full.index(eos)
    g = _gen(model, params, [prompt], max_new_tokens=12, eos_id=eos)
    assert g.tokens[0] == full[:first] and g.finish_reasons == ["eos"]
    # Stop sequence: two tokens at steps 6-7; output excludes them.
    stop = full[6:8]
    cut = next(i for i in range(len(full) - 1) if full[i : i + 2] == stop)
    g = _gen(
        model,
        params,
        [prompt, _prompts()[0]],
        max_new_tokens=12,
        eos_id=NO_EOS,
        stop_sequences=[[VOCAB + 5, VOCAB + 6, VOCAB + 7], stop],
    )
    assert g.tokens[0] == full[:cut] and g.finish_reasons[0] == "stop"
    # Cap: exactly max_new_tokens tokens, finish reason "length".
    g = _gen(model, params, [prompt], max_new_tokens=5, eos_id=NO_EOS)
    assert g.tokens[0] == full[:5] and g.finish_reasons == ["length"] and g.timing["steps"] == 5


def test_sharded_generation_equals_single_device(model_and_params):
    model, params = model_and_params
    mesh = make_mesh((2, 2, 2))  # tests/conftest.py gives every test 8 emulated devices
    prompts = _prompts()  # 3 rows: padded to 4 for the 2x2 data shards
    want, want_logits = _tl(
        _gen(model, params, prompts, max_new_tokens=6, eos_id=NO_EOS, return_logits=True)
    )
    sharded = shard_params(model, params, mesh)
    kernel = sharded["layers_0"]["attn"]["q_kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    got, got_logits = _tl(
        _gen(
            model, sharded, prompts, max_new_tokens=6, eos_id=NO_EOS, return_logits=True, mesh=mesh
        )
    )
    assert got == want
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=2e-5)


def test_generate_text_stop_strings(model_and_params):
    model, params = model_and_params
    tok = CharTokenizer([chr(c) for c in range(32, 32 + VOCAB - 4)])
    hello = [tok.encode("hello")]
    g = _gen(model, params, hello, max_new_tokens=10, eos_id=tok.eos_id)
    full, reasons = decode_completions(tok, g)
    assert reasons == ["length"] and len(full[0]) == 10
    stop = full[0][3:5]
    sp = SamplingParams(10, tok.eos_id, stop_sequences=stop_token_ids(tok, [stop]))
    text, reasons = decode_completions(tok, generate(model, params, hello, sp), [stop])
    assert text == [full[0][: full[0].index(stop)]] and reasons == ["stop"]
    assert truncate_at_stop("abc\n\nxyz", ["z", "\n\n"]) == ("abc", True)
    assert truncate_at_stop("abc", ["q"]) == ("abc", False)


def test_equal_sampling_params_are_one_static_key():
    """Settings given as numpy scalars or lists key the same compiled decode as plain ones."""
    a = SamplingParams(np.int64(8), -1, np.float32(0.5), top_k=np.int32(5), stop_sequences=[[1, 2]])
    b = SamplingParams(8, -1, 0.5, top_k=5, stop_sequences=((1, 2),))
    assert a == b and hash(a) == hash(b) and type(a.top_k) is int
    with pytest.raises(LmtrainError, match="non-empty"):
        SamplingParams(8, -1, stop_sequences=[[]])


def test_bad_arguments_raise_clear_errors(model_and_params):
    model, params = model_and_params
    with pytest.raises(LmtrainError, match="at least one token"):
        _gen(model, params, [[5], []], max_new_tokens=3, eos_id=2)
    with pytest.raises(LmtrainError, match="max_new_tokens=0"):
        _gen(model, params, [[5]], max_new_tokens=0, eos_id=2)
    with pytest.raises(LmtrainError, match="top_p=1.5"):
        _gen(model, params, [[5]], max_new_tokens=3, eos_id=2, top_p=1.5)


def test_generation_past_the_context_slides_a_half_context_window(model_and_params):
    """Outputs longer than max_seq_len (64) continue from the last 32 tokens, never from
    positions the model was not built for; within the context it is plain generate."""
    model, params = model_and_params
    prompt = list(np.random.default_rng(5).integers(1, VOCAB, 10))
    short = _gen(model, params, [prompt], max_new_tokens=20, eos_id=NO_EOS, past_context=True)
    assert short.tokens == _gen(model, params, [prompt], max_new_tokens=20, eos_id=NO_EOS).tokens

    out = _gen(model, params, [prompt], max_new_tokens=100, eos_id=NO_EOS, past_context=True)
    out = out.tokens[0]
    assert len(out) == 100
    for j in (0, 32, 64, 96):  # the first token of each round, from a full forward pass
        window = (prompt + out[:j])[-32:]
        logits = model.apply({"params": params}, jnp.asarray([window], jnp.int32))
        assert out[j] == int(np.argmax(np.asarray(logits)[0, -1])), j


def test_past_the_context_rows_end_at_a_stop_sequence_with_their_reason(model_and_params):
    """The sliding rounds keep stop sequences and finish reasons (used by `lmtrain generate`)."""
    model, params = model_and_params
    prompt = list(np.random.default_rng(6).integers(1, VOCAB, 10))
    free = _gen(model, params, [prompt], max_new_tokens=100, eos_id=NO_EOS, past_context=True)
    out = free.tokens[0]
    assert len(out) == 100 and free.finish_reasons == ["length"]
    # a token pair inside the second round (outputs 32..63) that does not occur earlier
    j = next(j for j in range(33, 62) if all(out[i : i + 2] != out[j : j + 2] for i in range(j)))
    stopped = _gen(model, params, [prompt], max_new_tokens=100, eos_id=NO_EOS,
                   stop_sequences=[out[j : j + 2]], past_context=True)  # fmt: skip
    assert stopped.tokens == [out[:j]] and stopped.finish_reasons == ["stop"]
    assert stopped.timing["prefill_s"] > 0 and stopped.timing["steps"] > 0


@pytest.mark.parametrize("on_mesh", [False, True])
def test_compile_only_compiles_what_the_real_call_runs(model_and_params, on_mesh):
    """Abstract params in, the compiled programs out; the real call then compiles nothing."""
    import logging

    model, params = model_and_params
    mesh = make_mesh((2, 2, 2)) if on_mesh else None
    prompts = [[5, 6, 7, 8, 9, 10, 11]] * 3  # B=3 (4 on the mesh) x P=7: shapes no other test uses
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    kw = dict(max_new_tokens=9, eos_id=NO_EOS, temperature=0.7, top_k=5, seed=3, mesh=mesh)
    programs = _gen(model, abstract, prompts, compile_only=True, **kw)
    assert sorted(programs) == ["decode", "prefill"]
    assert all(p.memory_analysis().temp_size_in_bytes >= 0 for p in programs.values())
    logger = logging.getLogger("jax._src.interpreters.pxla")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        real = params if mesh is None else shard_params(model, params, mesh)
        g = _gen(model, real, prompts, **kw)
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(handler)
    compiled = [r.getMessage() for r in records if r.getMessage().startswith("Compiling jit(")]
    assert not [m for m in compiled if "_prefill" in m or "_decode" in m], compiled
    assert len(g.tokens) == 3 and all(len(t) == 9 for t in g.tokens)
