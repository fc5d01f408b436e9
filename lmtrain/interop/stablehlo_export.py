"""``lmtrain export stablehlo <workdir> <dir>``: forward and decode as serialised StableHLO.

``jax.export`` lowers the model to StableHLO with symbolic batch and length dimensions, so the
artefacts run without lmtrain's model code (only ``jax`` is needed to call them):

- ``forward.jax_exported``: ``(params, tokens[b, t]) -> logits[b, t, V]`` (float32);
- ``decode.jax_exported``: ``(params, cache, tokens[b, t], positions[b, t], segment_ids[b, t],
  cache_offset) -> (logits[b, t, V], cache)``, the KV-cached step (``t`` = prompt length for a
  prefill, 1 per generated token); ``cache`` is ``{"seg": int32[b, s], "layers": [{"k", "v"}:
  [b, s, K, Dh]] * L}`` with ``s`` the cache length, zeros to start;
- ``params.safetensors``: the weights, named by their path (``layers_0/attn/q_kernel``);
- ``manifest.json``: shapes, dtypes, calling convention and the platforms lowered for.

Lengths past the model's context are refused: the symbolic shapes carry ``t <= max_seq_len``
(and ``s <= max_seq_len`` for the cache), so the serialised functions themselves reject longer
inputs whoever calls them, and ``ExportedModel`` says so in one line before calling.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.errors import CheckpointError, DataError
from lmtrain.interop.safetensors_io import SafetensorsReader, TensorSpec, write_safetensors
from lmtrain.model.config import ModelConfig
from lmtrain.model.param_tree import flatten, unflatten
from lmtrain.model.transformer import Transformer, init_cache
from lmtrain.train.run_loader import load_workdir

FORWARD = "forward.jax_exported"
DECODE = "decode.jax_exported"
PARAMS = "params.safetensors"
MANIFEST = "manifest.json"


def export_functions(
    model_cfg: ModelConfig, params: dict, platforms: tuple[str, ...] | None = None
):
    """(forward, decode) ``jax.export.Exported`` objects with symbolic b, t and s."""
    model = Transformer(model_cfg)
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)  # noqa: E731
    p_spec = jax.tree.map(spec, params)
    ctx = int(model_cfg.max_seq_len)
    b, t, s = jax.export.symbolic_shape("b, t, s", constraints=("s >= t", f"s <= {ctx}"))

    def forward(p, tokens):
        return model.apply({"params": p}, tokens)

    def decode(p, cache, tokens, positions, segment_ids, cache_offset):
        return model.apply(
            {"params": p}, tokens, positions, segment_ids, kv_cache=cache, cache_offset=cache_offset
        )

    tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
    fwd_tok = jax.ShapeDtypeStruct(
        jax.export.symbolic_shape("b, t", constraints=(f"t <= {ctx}",)), jnp.int32
    )
    abstract_cache = jax.eval_shape(lambda: init_cache(model_cfg, 1, 1))
    cache_spec = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((b, s, *a.shape[2:]), a.dtype), abstract_cache
    )
    kwargs = {"platforms": platforms} if platforms else {}
    fwd = jax.export.export(jax.jit(forward), **kwargs)(p_spec, fwd_tok)
    dec = jax.export.export(jax.jit(decode), **kwargs)(
        p_spec, cache_spec, tok, tok, tok, jax.ShapeDtypeStruct((), jnp.int32)
    )
    return fwd, dec


def export_stablehlo(
    workdir: str, out_dir: str, *, step: int | None = None, platforms: tuple[str, ...] | None = None
) -> dict:
    loaded = load_workdir(workdir, step)
    params = loaded.plain_params()
    fwd, dec = export_functions(loaded.model_cfg, params, platforms)
    os.makedirs(out_dir, exist_ok=True)
    for name, exp in ((FORWARD, fwd), (DECODE, dec)):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(bytes(exp.serialize()))
    flat = flatten(params)
    write_safetensors(
        out_dir,
        [TensorSpec(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()],
        filename=PARAMS,
        metadata={"format": "lmtrain"},
    )
    m = loaded.model_cfg
    manifest = {
        "format": "lmtrain-stablehlo-v1",
        "platforms": list(fwd.platforms),
        "step": loaded.step,
        "vocab_size": m.vocab_size,
        "max_seq_len": m.max_seq_len,
        "n_layers": m.n_layers,
        "n_kv_heads": m.n_kv_heads,
        "head_dim": m.kv_dim,
        "cache_dtype": str(jnp.dtype(m.compute_dtype)),
        "forward": {
            "file": FORWARD,
            "args": ["params", "tokens int32[b,t]"],
            "returns": "logits f32[b,t,V]",
        },
        "decode": {
            "file": DECODE,
            "args": [
                "params",
                "cache",
                "tokens int32[b,t]",
                "positions int32[b,t]",
                "segment_ids int32[b,t]",
                "cache_offset int32[]",
            ],
            "returns": ["logits f32[b,t,V]", "cache"],
        },
        "params": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
        "eos_id": loaded.tokenizer.eos_id,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return {
        "out_dir": os.path.abspath(out_dir),
        "platforms": manifest["platforms"],
        "step": loaded.step,
    }


class ExportedModel:
    """Loads an ``export stablehlo`` directory and calls it (no lmtrain model code involved)."""

    def __init__(self, directory: str):
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise CheckpointError(f"{directory} is not a StableHLO export: {MANIFEST} is missing")
        with open(path) as f:
            self.manifest = json.load(f)
        with open(os.path.join(directory, FORWARD), "rb") as f:
            self._forward = jax.export.deserialize(bytearray(f.read()))
        with open(os.path.join(directory, DECODE), "rb") as f:
            self._decode = jax.export.deserialize(bytearray(f.read()))
        reader = SafetensorsReader(os.path.join(directory, PARAMS))
        self.params = unflatten({n: np.array(reader.get(n)) for n in reader.names()})

    def _check_length(self, what: str, length: int) -> None:
        ctx = int(self.manifest["max_seq_len"])
        if length > ctx:
            raise DataError(
                f"{what} has length {length}, past the model's context of {ctx} tokens; "
                f"pass at most {ctx} (keep the last {ctx} tokens of a longer text)"
            )

    def forward(self, tokens) -> np.ndarray:
        tokens = jnp.asarray(tokens, jnp.int32)
        self._check_length("tokens", tokens.shape[-1])
        return np.asarray(self._forward.call(self.params, tokens))

    def empty_cache(self, batch: int, length: int) -> dict:
        self._check_length("the KV cache", length)
        m = self.manifest
        shape = (batch, length, m["n_kv_heads"], m["head_dim"])
        dtype = jnp.dtype(m["cache_dtype"])
        layers = [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(m["n_layers"])
        ]
        return {"seg": jnp.zeros((batch, length), jnp.int32), "layers": layers}

    def decode(self, cache, tokens, positions, segment_ids, cache_offset: int):
        i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        self._check_length("the KV cache", int(cache["seg"].shape[1]))
        pos = np.asarray(positions)
        if pos.size and int(pos.max()) >= int(self.manifest["max_seq_len"]):
            self._check_length("positions", int(pos.max()) + 1)
        logits, cache = self._decode.call(
            self.params, cache, i32(tokens), i32(positions), i32(segment_ids), i32(cache_offset)
        )
        return np.asarray(logits), cache

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt with the KV cache (a usage example and test hook)."""
        n = len(prompt)
        cache = self.empty_cache(1, n + max_new_tokens)
        logits, cache = self.decode(cache, [prompt], [list(range(n))], [[1] * n], 0)
        out = []
        for i in range(max_new_tokens):
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            if nxt == self.manifest.get("eos_id"):
                break
            logits, cache = self.decode(cache, [[nxt]], [[n + i]], [[1]], n + i)
        return out
