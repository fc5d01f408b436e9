"""The batching generation engine behind ``lmtrain serve``.

Requests wait in a queue; one worker thread takes the first, collects whatever else arrives
within ``batch_window_s`` (up to ``max_batch``) and decodes them together: prompts left-padded
into one KV cache, one jitted prefill, then one jitted step per token for the whole batch. Each
row samples with its own temperature/top-k/top-p, stops on its own (EOS, stop ids, a stop string
found in its decoded text, its token budget or its deadline) and pushes every token to its
request's queue as it is produced, which is what streaming reads. Shapes are bucketed to powers
of two so compiles are few.

Every step also returns the sampled token's log-probability and the top ``TOP_LOGPROBS``
alternatives under the model's own (unscaled) distribution, and the prefill the log-probability
of each prompt token given the ones before it: the first serve ``logprobs``, the second
``echo`` with logprobs and the prompt log-perplexity that ``/metrics`` tracks for drift.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.infer.sampling import left_pad, prefill_apply, sample_rows, step_apply
from lmtrain.model.transformer import Transformer, init_cache
from lmtrain.quant.int8 import dequantize_params

_DONE = object()
TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's chat limit)


@dataclasses.dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    deadline: float = float("inf")
    # Stop strings are matched on the decoded text (a tokenizer may split one differently in
    # context); ``decode`` turns this request's output ids into that text.
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None
    logprobs: int = -1  # -1: none; k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: int = -1  # the same for the prompt tokens (``echo`` with ``logprobs``)
    observe_prompt: bool = True  # False on the 2nd..nth sample of one prompt: count it once
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    finish_reason: str | None = None
    output: list[int] = dataclasses.field(default_factory=list)
    # Filled by the engine: (logprob, [(id, logprob)...]) per output token / prompt token
    # (the first prompt token has none); the prompt's mean negative log-likelihood per token.
    output_logprobs: list = dataclasses.field(default_factory=list)
    prompt_token_logprobs: list = dataclasses.field(default_factory=list)
    prompt_nll: float | None = None
    submitted_at: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def tokens(self):
        """Yields generated ids as they come; ``finish_reason`` is set when it returns."""
        while True:
            item = self.events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _bucket(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class Engine:
    def __init__(
        self,
        model_cfg,
        params,
        *,
        eos_ids=(),
        pad_id: int = 0,
        max_batch: int = 8,
        batch_window_s: float = 0.02,
        quantized: bool = False,
        seed: int = 0,
        metrics=None,
    ):
        self.cfg = model_cfg
        self.model = Transformer(model_cfg)
        self.params = params
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.pad_id = max(int(pad_id), 0)
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "max_batch_size": 0, "tokens": 0}
        self.metrics = metrics  # lmtrain.serve.metrics.ServeMetrics or None
        self._rng = jax.random.PRNGKey(seed)
        self._stop = threading.Event()
        weights = (
            (lambda p: dequantize_params(p, model_cfg.params_dtype)) if quantized else (lambda p: p)
        )
        model = self.model

        top_n = min(TOP_LOGPROBS, model_cfg.vocab_size)

        @functools.partial(jax.jit, static_argnums=(4,))
        def prefill(p, tokens, seg, cache, prompt_top: bool):
            logits, cache = prefill_apply(model, weights(p), tokens, seg, cache)
            # log p(token t+1 | tokens <= t) for every prompt position; padding is masked later.
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            token_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            top = jax.lax.top_k(logp, top_n) if prompt_top else None
            return logits[:, -1], cache, token_lp, top

        @jax.jit
        def step(p, pos, cache, offset, rng, temp, top_k, top_p, last):
            nxt = sample_rows(last, rng, temp, top_k, top_p)
            logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
            chosen_lp = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(logp, top_n)
            logits, cache = step_apply(model, weights(p), nxt, pos, cache, offset)
            return nxt, logits, cache, chosen_lp, top_lp, top_ids

        self._prefill, self._step = prefill, step
        self._thread = threading.Thread(target=self._loop, name="lmtrain-engine", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> GenRequest:
        self.queue.put(req)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())
        return req

    def prompt_nll(self, rows: list[list[int]]) -> list[float]:
        """Mean negative log-likelihood per token of each row (each at least 2 ids), batched
        as the server batches prompts; used for the validation-split reference of the drift
        signal."""
        out: list[float] = []
        for i in range(0, len(rows), self.max_batch):
            chunk = rows[i : i + self.max_batch]
            B, P = _bucket(len(chunk), 1), _bucket(max(len(r) for r in chunk))
            tokens, seg = self._left_pad(chunk, B, P)
            _, _, token_lp, _ = self._prefill(
                self.params, tokens, seg, init_cache(self.cfg, B, P), False
            )
            token_lp = np.asarray(token_lp)
            for j, r in enumerate(chunk):
                out.append(float(-token_lp[j, P - len(r) :].mean()))
        return out

    def _left_pad(self, rows: list[list[int]], B: int, P: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, seg = left_pad(rows, B, P, self.pad_id)
        seg[len(rows) :, -1] = 1  # filler rows: one real token so softmax rows stay finite
        return tokens, seg

    def close(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self) -> list[GenRequest]:
        first = self.queue.get()
        if first is None:
            return []
        batch = [first]
        end = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get(timeout=max(end - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            batch.append(item)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - hand the failure to every waiting request
                for r in batch:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.events.put(e)

    def _run(self, batch: list[GenRequest]) -> None:
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(batch))
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        B = _bucket(len(batch), 1)
        P = _bucket(max(len(r.prompt_ids) for r in batch))
        new = max(r.max_tokens for r in batch)
        S = _bucket(P + new)  # cache slots; positions count real tokens, so RoPE never sees S
        tokens, seg = self._left_pad([r.prompt_ids for r in batch], B, P)
        cache = init_cache(self.cfg, B, S)
        prompt_top = any(r.prompt_logprobs >= 0 for r in batch)
        last, cache, token_lp, top = self._prefill(self.params, tokens, seg, cache, prompt_top)
        self._record_prompts(batch, P, np.asarray(token_lp), top)
        pos = seg.sum(axis=1).astype(np.int32)
        pad = lambda vals, fill: np.asarray(vals + [fill] * (B - len(batch)))  # noqa: E731
        temp = pad([r.temperature for r in batch], 0.0).astype(np.float32)
        top_k = pad([r.top_k for r in batch], 0).astype(np.int32)
        top_p = pad([r.top_p for r in batch], 1.0).astype(np.float32)
        active = [True] * len(batch)
        want_lp = any(r.logprobs >= 0 for r in batch)
        prev = time.monotonic()
        for t in range(new):
            self._rng, sub = jax.random.split(self._rng)
            nxt, last, cache, chosen_lp, top_lp, top_ids = self._step(
                self.params, pos + t, cache, P + t, sub, temp, top_k, top_p, last
            )
            ids = np.asarray(nxt)
            if want_lp:
                chosen_lp, top_lp, top_ids = map(np.asarray, (chosen_lp, top_lp, top_ids))
            now = time.monotonic()
            if self.metrics is not None:
                self.metrics.step_seconds.observe(now - prev)
            prev = now
            for i, r in enumerate(batch):
                if not active[i]:
                    continue
                tok = int(ids[i])
                if r.first_token_at is None:
                    r.first_token_at = now
                    if self.metrics is not None:
                        self.metrics.ttft.observe(now - r.submitted_at)
                if tok in self.eos_ids or tok in r.stop_ids:
                    self._finish(r, "stop")
                elif now > r.deadline:
                    self._finish(r, "timeout")
                else:
                    r.output.append(tok)
                    if r.logprobs >= 0:
                        k = r.logprobs
                        alts = list(zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist()))
                        r.output_logprobs.append((float(chosen_lp[i]), alts))
                    self.stats["tokens"] += 1
                    r.events.put(tok)
                    if r.stop_strings and _has_stop(r.decode(r.output), r.stop_strings):
                        self._finish(r, "stop")
                    elif len(r.output) >= r.max_tokens:
                        self._finish(r, "length")
                active[i] = r.finish_reason is None
            if not any(active):
                break

    def _record_prompts(self, batch: list[GenRequest], P: int, token_lp, top) -> None:
        if top is not None:
            top_lp, top_ids = map(np.asarray, top)
        for i, r in enumerate(batch):
            n = len(r.prompt_ids)
            lps = token_lp[i, P - n :]  # positions of the row's 2nd..last prompt token
            if n > 1:
                r.prompt_nll = float(-lps.mean())
                if self.metrics is not None and r.observe_prompt:
                    self.metrics.prompt_log_perplexity.observe(r.prompt_nll)
            if r.prompt_logprobs >= 0:
                k = r.prompt_logprobs
                r.prompt_token_logprobs = [None] + [
                    (
                        float(lps[j]),
                        list(
                            zip(
                                top_ids[i, P - n + j, :k].tolist(),
                                top_lp[i, P - n + j, :k].tolist(),
                            )
                        ),
                    )
                    for j in range(n - 1)
                ]

    @staticmethod
    def _finish(r: GenRequest, reason: str) -> None:
        r.finish_reason = reason
        r.events.put(_DONE)


def _has_stop(text: str, stops: tuple[str, ...]) -> bool:
    return any(s in text for s in stops)
