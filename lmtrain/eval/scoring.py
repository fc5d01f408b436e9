"""Log-likelihood scoring with the model: held-out perplexity, bits per byte, continuations.

Every request is one token sequence plus the index of its first scored token; the scorer packs
requests into fixed (batch, length) arrays (right-padded, masked), so one jitted function serves
perplexity windows, multiple-choice answers and bias-probe continuations, sharded like training
(batch over data/fsdp, params as restored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lmtrain.errors import DataError
from lmtrain.model.sharding import batch_sharding, data_shards, mesh_rules


@dataclasses.dataclass(frozen=True)
class Request:
    """Score ``tokens[first_scored:]`` given everything before it (``first_scored >= 1``)."""

    tokens: tuple[int, ...]
    first_scored: int


def _nll_fn(model):
    def nll(params, inputs_BT, targets_BT, mask_BT):
        logits = model.apply({"params": params}, inputs_BT)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok_logp = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
        return -(tok_logp * mask_BT).sum(axis=1)  # (B,) summed NLL of the scored tokens

    return nll


class Scorer:
    """Summed NLL (nats) of requests, ``batch_size`` rows of ``seq_len`` tokens at a time."""

    def __init__(
        self, model, params, *, seq_len: int, batch_size: int = 16, mesh: Mesh | None = None
    ):
        self.model, self.params, self.seq_len, self.mesh = model, params, seq_len, mesh
        shards = data_shards(mesh) if mesh is not None else 1
        self.batch_size = -(-batch_size // shards) * shards
        self._jitted = jax.jit(_nll_fn(model))
        self.tokens_scored = 0

    def _place(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def nll(self, requests: Sequence[Request]) -> np.ndarray:
        """Summed NLL per request; sequences longer than ``seq_len + 1`` keep their tail."""
        out = np.zeros(len(requests), np.float64)
        B, T = self.batch_size, self.seq_len
        for start in range(0, len(requests), B):
            chunk = requests[start : start + B]
            inputs = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            mask = np.zeros((B, T), np.float32)
            for i, r in enumerate(chunk):
                if r.first_scored < 1 or r.first_scored >= len(r.tokens):
                    raise DataError(
                        f"scoring request needs 1 <= first_scored < len(tokens); got "
                        f"{r.first_scored} for {len(r.tokens)} tokens (is a continuation empty?)"
                    )
                toks, first = list(r.tokens), r.first_scored
                if len(toks) > T + 1:  # keep the scored tail; drop the oldest context
                    drop = len(toks) - (T + 1)
                    if drop >= first:
                        raise DataError(
                            f"scored part ({len(toks) - first} tokens) does not fit the model's "
                            f"window of {T}; shorten it or raise the eval seq_len"
                        )
                    toks, first = toks[drop:], first - drop
                n = len(toks) - 1
                inputs[i, :n] = toks[:-1]
                targets[i, :n] = toks[1:]
                mask[i, first - 1 : n] = 1.0
            self.tokens_scored += int(mask.sum())
            if self.mesh is not None:
                with mesh_rules(self.mesh):
                    nll = self._jitted(self.params, *map(self._place, (inputs, targets, mask)))
            else:
                nll = self._jitted(self.params, inputs, targets, mask)
            out[start : start + len(chunk)] = np.asarray(nll)[: len(chunk)]
        return out


def window_requests(ids: Sequence[int], seq_len: int) -> list[Request]:
    """Non-overlapping windows that predict every token after the first exactly once
    (context resets at window edges, as in the training loop's eval)."""
    ids = list(ids)
    return [
        Request(tuple(ids[s : s + seq_len + 1]), 1)
        for s in range(0, len(ids) - 1, seq_len)
        if len(ids[s : s + seq_len + 1]) > 1
    ]


def continuation_request(context: Sequence[int], continuation: Sequence[int]) -> Request:
    if not context or not continuation:
        raise DataError("continuation scoring needs a non-empty context and continuation")
    return Request(tuple(context) + tuple(continuation), len(context))


def document_nll(scorer: Scorer, docs: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per document; its first token is context only."""
    reqs, owner = [], []
    for d, ids in enumerate(docs):
        for r in window_requests(ids, scorer.seq_len):
            reqs.append(r)
            owner.append(d)
    nll = scorer.nll(reqs) if reqs else np.zeros(0)
    totals = [[0.0, 0] for _ in docs]
    for r, d, v in zip(reqs, owner, nll):
        totals[d][0] += float(v)
        totals[d][1] += len(r.tokens) - 1
    return [(a, b) for a, b in totals]
