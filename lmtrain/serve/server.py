"""HTTP server with the OpenAI completion and chat shapes: ``/v1/completions``,
``/v1/chat/completions`` (both with ``"stream": true`` as server-sent events) and ``/health``.

Bad input never reaches the model: a body over ``max_body_bytes`` gets 413, malformed JSON or
invalid fields 400 with a message, a prompt plus ``max_tokens`` beyond the context 400, a full
queue 503. Each request also has a wall-clock budget (``timeout_s``); when it runs out the
answer ends with ``finish_reason: "timeout"``. Only the standard library is used.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmtrain.data.chat_template import ChatTemplate
from lmtrain.errors import DataError
from lmtrain.serve.engine import Engine, GenRequest


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 256  # per request
    default_max_tokens: int = 16
    timeout_s: float = 60.0
    max_queue: int = 64


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelService:
    """Turns validated OpenAI-shaped requests into engine requests and responses."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, limits: ServeLimits):
        self.engine, self.tokenizer, self.model_name, self.limits = (
            engine,
            tokenizer,
            model_name,
            limits,
        )
        self.template = self._chat_template()

    def _chat_template(self) -> ChatTemplate:
        t = ChatTemplate()
        try:
            for piece in (t.system, t.user, t.assistant, t.end):
                self.tokenizer.token_id(piece)
            return t
        except DataError:  # no chat specials in this vocabulary: markers as plain text
            return ChatTemplate(markers_are_special=False)

    def _number(self, body: dict, key: str, default, kind, lo, hi):
        value = body.get(key, default)
        if value is None:
            value = default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and value != int(value))
        ):
            raise RequestError(
                400, f"'{key}' must be {'an integer' if kind is int else 'a number'}"
            )
        if not lo <= value <= hi:
            raise RequestError(400, f"'{key}'={value} must be between {lo} and {hi}")
        return kind(value)

    def build(
        self, body: dict, prompt_ids: list[int], extra_stops: tuple[int, ...] = ()
    ) -> GenRequest:
        lim = self.limits
        max_tokens = self._number(
            body, "max_tokens", lim.default_max_tokens, int, 1, lim.max_tokens
        )
        if not prompt_ids:
            raise RequestError(400, "the prompt is empty after tokenization")
        ctx = self.engine.cfg.max_seq_len
        if len(prompt_ids) + max_tokens > ctx:
            raise RequestError(
                400,
                f"prompt of {len(prompt_ids)} tokens plus max_tokens={max_tokens} exceeds the "
                f"model's context of {ctx} tokens",
            )
        stops = list(extra_stops)
        stop = body.get("stop")
        for s in [stop] if isinstance(stop, str) else stop or []:
            if not isinstance(s, str):
                raise RequestError(400, "'stop' must be a string or a list of strings")
            ids = self.tokenizer.encode(s)
            if len(ids) == 1:
                stops.append(ids[0])
        return GenRequest(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=self._number(body, "temperature", 1.0, float, 0.0, 5.0),
            top_k=self._number(body, "top_k", 0, int, 0, 1 << 20),
            top_p=self._number(body, "top_p", 1.0, float, 0.0, 1.0),
            stop_ids=tuple(stops),
            deadline=time.monotonic() + lim.timeout_s,
        )

    def completion_request(self, body: dict) -> GenRequest:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
            ids = [int(i) for i in prompt]
            if max(ids) >= self.engine.cfg.vocab_size or min(ids) < 0:
                raise RequestError(400, "token ids in 'prompt' are outside the vocabulary")
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, bos=getattr(self.tokenizer, "add_bos", False))
        else:
            raise RequestError(400, "'prompt' must be a string (or one list of token ids)")
        return self.build(body, ids)

    def chat_request(self, body: dict) -> GenRequest:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(
                400, "'messages' must be a non-empty list of {role, content} objects"
            )
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise RequestError(400, f"messages[{i}] needs a string 'content'")
            turns.append((m.get("role"), m["content"]))
        try:
            ids = self.template.encode_generation_prompt(turns, self.tokenizer)
        except DataError as e:
            raise RequestError(400, f"invalid messages: {e}") from None
        end = ()
        if self.template.markers_are_special:
            end = (self.tokenizer.token_id(self.template.end),)
        return self.build(body, ids, end)

    def submit(self, req: GenRequest) -> GenRequest:
        if self.engine.queue.qsize() >= self.limits.max_queue:
            raise RequestError(503, "server busy: too many queued requests, retry later")
        return self.engine.submit(req)

    def usage(self, req: GenRequest) -> dict:
        n, m = len(req.prompt_ids), len(req.output)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


class Handler(BaseHTTPRequestHandler):
    server_version = "lmtrain-serve/1"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may take to send its request

    @property
    def service(self) -> ModelService:
        return self.server.service  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # quiet by default; --verbose turns it on
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):  # noqa: N802 - http.server naming
        if self.path.rstrip("/") == "/health":
            s = self.service
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
        elif self.path.rstrip("/") == "/v1/models":
            self._json(
                200,
                {"object": "list", "data": [{"id": self.service.model_name, "object": "model"}]},
            )
        else:
            self._error(
                404, f"no route {self.path}; use /v1/completions, /v1/chat/completions or /health"
            )

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(
                411, "Content-Length header required (chunked bodies are not accepted)"
            )
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        limit = self.service.limits.max_body_bytes
        if n > limit:
            self.close_connection = True  # the unread body would otherwise be parsed as a request
            raise RequestError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def do_POST(self):  # noqa: N802
        route = self.path.rstrip("/")
        try:
            if route not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(404, f"no route {self.path}")
            body = self._read_body()
            chat = route.endswith("chat/completions")
            s = self.service
            req = s.chat_request(body) if chat else s.completion_request(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError(400, "'stream' must be true or false")
            s.submit(req)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            if stream:
                self._stream(req, rid, chat)
            else:
                self._complete(req, rid, chat)
        except (BrokenPipeError, ConnectionResetError):
            req.deadline = 0.0  # client gone: let the engine drop the row at its next step

    def _complete(self, req: GenRequest, rid: str, chat: bool) -> None:
        try:
            ids = list(req.tokens())
        except Exception as e:  # noqa: BLE001 - engine failure → 500 with its message
            self._error(500, f"generation failed: {type(e).__name__}: {e}")
            return
        text = self.service.tokenizer.decode(ids)
        choice = {"index": 0, "finish_reason": req.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._json(
            200,
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.service.model_name,
                "choices": [choice],
                "usage": self.service.usage(req),
            },
        )

    def _stream(self, req: GenRequest, rid: str, chat: bool) -> None:
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
            "model": self.service.model_name,
        }

        def send(delta: str | None, finish: str | None, first: bool = False) -> None:
            if chat:
                d = {"role": "assistant"} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())
            self.wfile.flush()

        if chat:
            send(None, None, first=True)
        tok, ids, shown = self.service.tokenizer, [], ""
        try:
            for i in req.tokens():
                ids.append(i)
                text = tok.decode(ids)
                if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                    send(text[len(shown) :], None)
                    shown = text
        except Exception as e:  # noqa: BLE001
            self.wfile.write(
                f"data: {json.dumps({'error': {'message': str(e), 'code': 500}})}\n\n".encode()
            )
            return
        text = tok.decode(ids)
        if len(text) > len(shown):
            send(text[len(shown) :], None)
        send(None, req.finish_reason)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


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
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.service = service  # type: ignore[attr-defined]
        self.httpd.verbose = verbose  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Server:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="lmtrain-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
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
) -> ModelService:
    """A ModelService for a workdir's latest checkpoint (LoRA adapters merged; optional int8)."""
    import os

    import jax
    import numpy as np

    from lmtrain.interop.workdir import load_workdir
    from lmtrain.model import lora

    loaded = load_workdir(workdir, step)
    params = loaded.params
    if lora.has_lora(params) or "embedding" not in params:
        from lmtrain.interop.hf_export import combined_params

        params = jax.tree.map(np.asarray, lora.merge(combined_params(loaded)))
    if int8:
        from lmtrain.quant.int8 import quantize_params

        params = quantize_params(params)
    tok = loaded.tokenizer
    stops = getattr(tok, "stop_ids", None) or [tok.eos_id]
    engine = Engine(
        loaded.model_cfg,
        params,
        eos_ids=stops,
        pad_id=tok.pad_id,
        max_batch=max_batch,
        quantized=int8,
        batch_window_s=batch_window_s,
    )
    name = os.path.basename(os.path.abspath(workdir))
    return ModelService(engine, tok, model_name=name, limits=limits or ServeLimits())
