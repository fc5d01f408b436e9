"""HTTP server with the OpenAI completion and chat shapes: ``/v1/completions``,
``/v1/chat/completions`` (both with ``"stream": true`` as server-sent events), ``/v1/models``,
``/health`` and ``/metrics`` (Prometheus text format).

Bad input never reaches the model: a body over ``max_body_bytes`` gets 413, malformed JSON or
any invalid field 400 naming the field (``lmtrain.serve.request``), a prompt plus ``max_tokens``
beyond the context 400, a missing or wrong API key 401, a full queue or a full connection pool
503 with ``Retry-After``. Connections are served by a fixed worker pool behind a real listen
backlog (``lmtrain.serve.http_pool``). Each request also has a wall-clock budget (``timeout_s``);
when it runs out the answer ends with ``finish_reason: "timeout"``.

Stop strings are matched on the decoded text and the text is cut before the earliest one, as
OpenAI does; a stream holds back any tail that could still become a stop string. ``n`` and
several prompts per request give one choice each (``index = prompt * n + sample``); ``echo``
prepends the prompt; ``logprobs`` (completions: 0-5, chat: ``logprobs``/``top_logprobs``) come
from the model's unscaled distribution; ``stream_options.include_usage`` adds the usage chunk.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler

from lmtrain.data.chat_template import ChatTemplate
from lmtrain.errors import DataError
from lmtrain.quant.int8 import quantize_params
from lmtrain.serve import request as rq
from lmtrain.serve.drift import reference_log_perplexity
from lmtrain.serve.engine import Engine, GenRequest
from lmtrain.serve.hf_chat import HFChatTemplate
from lmtrain.serve.http_pool import PooledHTTPServer
from lmtrain.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lmtrain.serve.metrics import ServeMetrics
from lmtrain.serve.request import RequestError
from lmtrain.train.run_loader import load_workdir

DRAIN_BYTES = 8 << 20  # most of an oversized body read before answering 413
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 256  # per request
    default_max_tokens: int = 16
    timeout_s: float = 60.0
    max_queue: int = 64  # generation rows waiting for the engine
    max_n: int = 8  # choices per request (n times the number of prompts)
    workers: int = 32  # connections served at once
    max_pending: int = 32  # accepted connections waiting for a worker; more get 503
    backlog: int = 1024  # listen() backlog
    retry_after_s: int = 1


def stop_cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ModelService:
    """Turns validated OpenAI-shaped requests into engine requests and responses."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        model_name: str,
        limits: ServeLimits,
        hf_template=None,
        api_key: str | None = None,
        metrics: ServeMetrics | None = None,
    ):
        self.engine, self.tokenizer, self.model_name, self.limits = (
            engine,
            tokenizer,
            model_name,
            limits,
        )
        self.hf_template = hf_template  # lmtrain.serve.hf_chat.HFChatTemplate or None
        self.template = self._chat_template()
        self.api_key = api_key or None
        self.metrics = metrics or ServeMetrics(model_name)
        if engine.metrics is None:
            engine.metrics = self.metrics

    def _chat_template(self) -> ChatTemplate:
        t = ChatTemplate()
        try:
            for piece in (t.system, t.user, t.assistant, t.end):
                self.tokenizer.token_id(piece)
            return t
        except DataError:  # no chat specials in this vocabulary: markers as plain text
            return ChatTemplate(markers_are_special=False)

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def sampling(self, body: dict, chat: bool) -> rq.Sampling:
        lim = self.limits
        return rq.sampling(
            body, chat=chat, max_tokens=lim.max_tokens, default_max_tokens=lim.default_max_tokens,
            max_n=lim.max_n, vocab_size=self.engine.cfg.vocab_size,
        )  # fmt: skip

    def rows(self, prompt_ids: list[int], s: rq.Sampling, extra_stops=(), prompt_lp=False):
        """``s.n`` engine requests for one prompt."""
        if not prompt_ids:
            raise RequestError(400, "'prompt' is empty after tokenization")
        ctx = self.engine.cfg.max_seq_len
        if len(prompt_ids) + s.max_tokens > ctx:
            raise RequestError(
                400,
                f"'prompt' of {len(prompt_ids)} tokens plus 'max_tokens'={s.max_tokens} exceeds "
                f"the model's context of {ctx} tokens",
            )
        deadline = time.monotonic() + self.limits.timeout_s
        return [
            GenRequest(
                prompt_ids=list(prompt_ids),
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                stop_ids=tuple(extra_stops),
                stop_strings=s.stop,
                decode=self.tokenizer.decode,
                logprobs=s.logprobs,
                prompt_logprobs=s.logprobs if prompt_lp else -1,
                deadline=deadline,
                observe_prompt=j == 0,
            )
            for j in range(s.n)
        ]

    def completion_rows(self, body: dict, s: rq.Sampling) -> list[list[GenRequest]]:
        per_prompt = []
        max_prompts = max(1, self.limits.max_n // s.n)
        for p in rq.prompts(body, self.engine.cfg.vocab_size, max_prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, bos=getattr(self.tokenizer, "add_bos", False))
            else:
                ids = [int(i) for i in p]
            per_prompt.append(self.rows(ids, s, prompt_lp=s.echo and s.logprobs >= 0))
        return per_prompt

    def chat_prompt_ids(self, msgs: list[dict]) -> tuple[list[int], tuple[int, ...]]:
        """The prompt ids for ``msgs`` and the extra stop ids (the template's end marker)."""
        if self.hf_template is not None:
            try:
                return self.hf_template.encode(msgs, self.tokenizer), ()
            except DataError as e:
                raise RequestError(400, f"invalid 'messages': {e}") from None
        turns = [(m["role"], m["content"]) for m in msgs]
        try:
            ids = self.template.encode_generation_prompt(turns, self.tokenizer)
        except DataError as e:
            raise RequestError(400, f"invalid 'messages': {e}") from None
        end = ()
        if self.template.markers_are_special:
            end = (self.tokenizer.token_id(self.template.end),)
        return ids, end

    def chat_rows(self, body: dict, s: rq.Sampling) -> list[list[GenRequest]]:
        ids, end = self.chat_prompt_ids(rq.messages(body))
        return [self.rows(ids, s, end)]

    def submit(self, per_prompt: list[list[GenRequest]]) -> None:
        reqs = [r for rows in per_prompt for r in rows]
        if self.engine.queue.qsize() + len(reqs) > self.limits.max_queue:
            raise RequestError(
                503,
                "server busy: too many queued requests, retry later",
                retry_after=self.limits.retry_after_s,
            )
        self.metrics.prompt_tokens.inc(sum(len(rows[0].prompt_ids) for rows in per_prompt))
        for r in reqs:
            self.engine.submit(r)

    def usage(self, per_prompt: list[list[GenRequest]]) -> dict:
        n = sum(len(rows[0].prompt_ids) for rows in per_prompt)
        m = sum(len(r.output) for rows in per_prompt for r in rows)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    # -- logprobs in the two OpenAI shapes ----------------------------------------------------
    def _piece(self, i: int) -> str:
        return self.tokenizer.decode([i])

    def completion_logprobs(self, r: GenRequest, kept_chars: int, echo: bool) -> dict:
        entries = (r.prompt_token_logprobs if echo else []) + r.output_logprobs
        ids = (r.prompt_ids if echo else []) + r.output[: len(r.output_logprobs)]
        tokens, token_lps, tops, offsets, at = [], [], [], [], 0
        limit = kept_chars + (len(self.tokenizer.decode(r.prompt_ids)) if echo else 0)
        for i, e in zip(ids, entries):
            if at >= limit and tokens:
                break
            piece = self._piece(i)
            tokens.append(piece)
            offsets.append(at)
            token_lps.append(None if e is None else e[0])
            tops.append(None if e is None else {self._piece(a): lp for a, lp in e[1]})
            at += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def chat_logprobs(self, r: GenRequest, kept_chars: int) -> dict:
        content, at = [], 0
        for i, (lp, alts) in zip(r.output, r.output_logprobs):
            if at >= kept_chars and content:
                break
            piece = self._piece(i)
            content.append(
                {
                    "token": piece,
                    "logprob": lp,
                    "bytes": list(piece.encode()),
                    "top_logprobs": [
                        {
                            "token": self._piece(a),
                            "logprob": v,
                            "bytes": list(self._piece(a).encode()),
                        }
                        for a, v in alts
                    ],
                }
            )
            at += len(piece)
        return {"content": content}


class Handler(BaseHTTPRequestHandler):
    server_version = "lmtrain-serve/1"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may take to send its request (or idle between requests)

    @property
    def service(self) -> ModelService:
        return self.server.service  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # quiet by default; --verbose turns it on
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def _endpoint(self) -> str:
        route = getattr(self, "path", "").split("?")[0].rstrip("/")
        return route if route in ROUTES else "other"

    def send_response(self, code, message=None):  # every answer passes here: count it
        super().send_response(code, message)
        m = getattr(self.server, "service", None)
        if m is not None:
            m.metrics.requests.labels(self._endpoint(), str(code)).inc()
            if code >= 400:
                kind = {401: "unauthorized", 404: "not_found", 413: "too_large", 503: "busy"}
                m.metrics.errors.labels(
                    kind.get(code, "bad_request" if code < 500 else "server")
                ).inc()
        # Keep-alive would let one client hold a worker while others wait for one.
        if getattr(self.server, "busy", lambda: False)():
            self.close_connection = True

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, retry_after: int | None = None) -> None:
        kind = {401: "authentication_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _check_key(self) -> None:
        if not self.service.authorized(self.headers.get("Authorization")):
            missing = self.headers.get("Authorization") is None
            raise RequestError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'"
                if missing
                else "invalid API key",
            )

    def do_GET(self):  # noqa: N802 - http.server naming
        route = self.path.split("?")[0].rstrip("/")
        s = self.service
        try:
            if route == "/health":
                self._json(
                    200,
                    {
                        "status": "ok",
                        "model": s.model_name,
                        "context": s.engine.cfg.max_seq_len,
                        "queue": s.engine.queue.qsize(),
                        "stats": dict(s.engine.stats),
                    },
                )
            elif route == "/metrics":
                s.metrics.queue_depth.set(s.engine.queue.qsize())
                s.metrics.connections.set(getattr(self.server, "active", 0))
                data = s.metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", METRICS_CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif route == "/v1/models":
                self._check_key()
                self._json(
                    200, {"object": "list", "data": [{"id": s.model_name, "object": "model"}]}
                )
            else:
                raise RequestError(
                    404,
                    f"no route {self.path}; use /v1/completions, /v1/chat/completions, "
                    "/v1/models, /health or /metrics",
                )
        except RequestError as e:
            self._error(e.status, str(e), e.retry_after)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(
                411, "Content-Length header required (chunked bodies are not accepted)"
            )
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        limit = self.service.limits.max_body_bytes
        if n > limit:
            self.close_connection = True  # the unread body would otherwise be parsed as a request
            # Read (and drop) a bounded amount first: closing with unread bytes resets the
            # connection, and the client would see the reset instead of this answer.
            left = min(n, DRAIN_BYTES)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
            raise RequestError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
        return self.rfile.read(n)

    @staticmethod
    def _parse(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def do_POST(self):  # noqa: N802
        route = self.path.split("?")[0].rstrip("/")
        started = time.monotonic()
        per_prompt: list[list[GenRequest]] = []
        try:
            self._post(route, per_prompt)
        finally:
            m = self.service.metrics
            m.generated_tokens.inc(sum(len(r.output) for rows in per_prompt for r in rows))
            m.request_seconds.labels(self._endpoint()).observe(time.monotonic() - started)

    def _post(self, route: str, per_prompt: list) -> None:
        s = self.service
        try:
            raw = self._read_body()  # read first: answering with bytes unread resets the peer
            if route not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(404, f"no route {self.path}")
            self._check_key()
            body = self._parse(raw)
            chat = route.endswith("chat/completions")
            sp = s.sampling(body, chat)
            rows = s.chat_rows(body, sp) if chat else s.completion_rows(body, sp)
            s.submit(rows)
            per_prompt.extend(rows)
        except RequestError as e:
            self._error(e.status, str(e), e.retry_after)
            return
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            if sp.stream:
                self._stream(per_prompt, sp, rid, chat)
            else:
                self._complete(per_prompt, sp, rid, chat)
        except (BrokenPipeError, ConnectionResetError):
            for rows in per_prompt:
                for r in rows:
                    r.deadline = 0.0  # client gone: let the engine drop the row at its next step

    def _complete(self, per_prompt, sp: rq.Sampling, rid: str, chat: bool) -> None:
        s = self.service
        choices = []
        try:
            for p, rows in enumerate(per_prompt):
                prompt_text = s.tokenizer.decode(rows[0].prompt_ids) if sp.echo else ""
                for j, r in enumerate(rows):
                    ids = list(r.tokens())
                    text, hit = stop_cut(s.tokenizer.decode(ids), sp.stop)
                    reason = "stop" if hit else r.finish_reason
                    choice = {"index": p * sp.n + j, "finish_reason": reason}
                    lp = None
                    if chat:
                        choice["message"] = {"role": "assistant", "content": text}
                        if sp.logprobs >= 0:
                            lp = s.chat_logprobs(r, len(text))
                    else:
                        choice["text"] = prompt_text + text
                        if sp.logprobs >= 0:
                            lp = s.completion_logprobs(r, len(text), sp.echo)
                    choice["logprobs"] = lp
                    choices.append(choice)
        except Exception as e:  # noqa: BLE001 - engine failure → 500 with its message
            self._error(500, f"generation failed: {type(e).__name__}: {e}")
            return
        self._json(
            200,
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": s.model_name,
                "choices": choices,
                "usage": s.usage(per_prompt),
            },
        )

    def _stream(self, per_prompt, sp: rq.Sampling, rid: str, chat: bool) -> None:
        s = self.service
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": s.model_name,
        }
        if sp.include_usage:
            base["usage"] = None

        def event(obj) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        def send(index: int, delta: str | None, finish: str | None, first=False) -> None:
            if chat:
                d = {"role": "assistant"} if first else ({"content": delta} if delta else {})
                choice = {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": None,
                          "finish_reason": finish}  # fmt: skip
            event({**base, "choices": [choice]})

        tok = s.tokenizer
        try:
            for p, rows in enumerate(per_prompt):
                for j, r in enumerate(rows):
                    index = p * sp.n + j
                    if chat:
                        send(index, None, None, first=True)
                    elif sp.echo:
                        send(index, tok.decode(r.prompt_ids), None)
                    ids, shown, hit = [], 0, False
                    for i in r.tokens():
                        if hit:
                            continue  # the engine ends the row right after a stop string
                        ids.append(i)
                        text = tok.decode(ids)
                        if text.endswith("\ufffd"):
                            continue  # a character split over tokens: wait for the rest
                        text, hit = stop_cut(text, sp.stop)
                        safe = len(text) if hit else len(text) - held_back(text, sp.stop)
                        if safe > shown:
                            send(index, text[shown:safe], None)
                            shown = safe
                    text, hit = stop_cut(tok.decode(ids), sp.stop)
                    if len(text) > shown:
                        send(index, text[shown:], None)
                    send(index, None, "stop" if hit else r.finish_reason)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # noqa: BLE001
            event({"error": {"message": str(e), "code": 500}})
            return
        if sp.include_usage:
            event({**base, "choices": [], "usage": s.usage(per_prompt)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class BusyHandler(BaseHTTPRequestHandler):
    """Answers every request with 503 and ``Retry-After`` (the pool and its wait line are full).

    The request is read first, body included, so the close that follows is clean."""

    protocol_version = "HTTP/1.1"
    server_version = Handler.server_version
    timeout = 5

    def log_message(self, fmt, *args):
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def _busy(self) -> None:
        service = self.server.service  # type: ignore[attr-defined]
        n = self.headers.get("Content-Length")
        try:
            n = int(n) if n is not None else 0
        except ValueError:
            n = 0
        if 0 < n <= service.limits.max_body_bytes:
            self.rfile.read(n)
        route = self.path.split("?")[0].rstrip("/")
        endpoint = route if route in ROUTES else "other"
        service.metrics.requests.labels(endpoint, "503").inc()
        service.metrics.errors.labels("busy").inc()
        data = json.dumps(
            {
                "error": {
                    "message": "server busy: all connections in use, retry later",
                    "type": "server_error",
                    "code": 503,
                }
            }
        ).encode()
        super().send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", str(service.limits.retry_after_s))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _busy  # noqa: N815


def is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    if host in ("localhost",):
        return True
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when ``host`` is not a loopback address and no key guards it."""
    if api_key or is_loopback(host):
        return None
    bar = "!" * 78
    return (
        f"{bar}\nWARNING: lmtrain serve is listening on {host or '0.0.0.0'} WITHOUT an API key:\n"
        "anyone who can reach this address can generate with the model and read /metrics.\n"
        "Pass --api-key KEY (or set LMTRAIN_API_KEY) and send 'Authorization: Bearer KEY',\n"
        f"or bind --host 127.0.0.1.\n{bar}"
    )


class Server:
    """A running server: ``Server(...).start()``; ``url`` is where it listens; ``close()`` stops it."""

    def __init__(
        self,
        service: ModelService,
        host: str = "127.0.0.1",
        port: int = 8000,
        verbose: bool = False,
    ):
        self.service = service
        lim = service.limits
        self.httpd = PooledHTTPServer(
            (host, port),
            Handler,
            BusyHandler,
            workers=lim.workers,
            max_pending=lim.max_pending,
            backlog=lim.backlog,
        )
        self.httpd.service = service  # type: ignore[attr-defined]
        self.httpd.verbose = verbose  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self._serving = False
        warning = exposure_warning(host, service.api_key)
        if warning:
            print(warning, file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Server:
        self._serving = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="lmtrain-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._serving:  # shutdown() waits for a serve_forever loop that must have run
            self.httpd.shutdown()
        self.httpd.server_close()
        self.service.engine.close()


def load_service(
    workdir: str,
    *,
    int8: bool = False,
    max_batch: int = 8,
    limits: ServeLimits | None = None,
    step: int | None = None,
    batch_window_s: float = 0.02,
    api_key: str | None = None,
    drift_reference: bool = True,
) -> ModelService:
    """A ModelService for a workdir's latest checkpoint (LoRA adapters merged; optional int8).

    A model imported from Hugging Face is prompted with its own chat template; the drift
    reference of ``/metrics`` is measured on the run's validation split when it is on disk."""
    import os

    loaded = load_workdir(workdir, step)
    params = loaded.plain_params()
    if int8:
        params = quantize_params(params)
    tok = loaded.tokenizer
    stops = getattr(tok, "stop_ids", None) or [tok.eos_id]
    name = os.path.basename(os.path.abspath(workdir))
    metrics = ServeMetrics(name)
    engine = Engine(
        loaded.model_cfg,
        params,
        eos_ids=stops,
        pad_id=tok.pad_id,
        max_batch=max_batch,
        quantized=int8,
        batch_window_s=batch_window_s,
        metrics=metrics,
    )
    if drift_reference:
        values, source, length = reference_log_perplexity(engine, loaded.config)
        metrics.set_reference(values, source, length)
    return ModelService(
        engine,
        tok,
        model_name=name,
        limits=limits or ServeLimits(),
        hf_template=HFChatTemplate.from_workdir(workdir),
        api_key=api_key,
        metrics=metrics,
    )
