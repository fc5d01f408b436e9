"""Validation of OpenAI-shaped request bodies: every field checked, every refusal names it.

A body that passes becomes ``Sampling`` (what each generated row needs) plus the prompt(s);
anything else is a ``RequestError`` with the HTTP status and one line naming the field and what
it must be. JSON accepts ``1e400`` and ``Infinity`` (both become ``inf``) and ``NaN``, so numbers
are checked for finiteness before any conversion. Fields the server does not implement are
refused when set to anything but their neutral value rather than silently ignored, and unknown
fields are refused by name (a misspelt ``max_token`` would otherwise fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math

MAX_STOPS = 4  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions limit
MAX_CHAT_TOP_LOGPROBS = 20

COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs", "suffix", "best_of"}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "parallel_tool_calls",
}


class RequestError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def bad(message: str) -> RequestError:
    return RequestError(400, message)


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int  # -1 off; else how many alternatives per token
    echo: bool = False


def number(body: dict, key: str, default, kind: type, lo, hi):
    """``body[key]`` as ``kind`` (int or float) within [lo, hi]; null means the default."""
    value = body.get(key, default)
    if value is None:
        value = default
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"'{key}' must be {what}, got {type(value).__name__} {value!r}"[:200])
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"'{key}' must be a finite {'integer' if kind is int else 'number'}, got {value}")
    if kind is int and value != int(value):
        raise bad(f"'{key}' must be an integer, got {value}")
    if not lo <= value <= hi:
        raise bad(f"'{key}'={value} must be between {lo} and {hi}")
    return kind(value)


def boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false, got {value!r}"[:200])
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list):
        raise bad(f"'stop' must be a string or a list of strings, got {stop!r}"[:200])
    if len(items) > MAX_STOPS:
        raise bad(f"'stop' may hold at most {MAX_STOPS} strings, got {len(items)}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise bad(f"'stop' entries must be non-empty strings, got {s!r}"[:200])
    return tuple(items)


def refuse_unsupported(body: dict, allowed: set[str]) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad(f"unknown field '{unknown[0]}'; this server accepts {', '.join(sorted(allowed))}")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("'model' must be a string")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string")
    for key in ("presence_penalty", "frequency_penalty"):
        if number(body, key, 0.0, float, -2.0, 2.0) != 0.0:
            raise bad(f"'{key}' is not supported by this server; leave it 0")
    if body.get("seed") is not None:
        raise bad("'seed' is not supported by this server (rows share one random stream)")
    if body.get("logit_bias") not in (None, {}):
        raise bad("'logit_bias' is not supported by this server")
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' is not supported by this server")
    for key in ("tools", "tool_choice", "functions", "function_call", "response_format"):
        if body.get(key) is not None:
            raise bad(f"'{key}' is not supported by this server")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise bad("'parallel_tool_calls' must be true or false")


def sampling(body: dict, *, chat: bool, max_tokens: int, default_max_tokens: int, max_n: int,
             vocab_size: int) -> Sampling:  # fmt: skip
    refuse_unsupported(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    tokens_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else None
    n_tokens = number(body, tokens_key or "max_tokens", default_max_tokens, int, 1, max_tokens)
    top_k = number(body, "top_k", 0, int, -1, vocab_size)
    n = number(body, "n", 1, int, 1, max_n)
    if not chat:
        best_of = number(body, "best_of", n, int, 1, max_n)
        if best_of != n:
            raise bad("'best_of' other than 'n' is not supported by this server")
    stream = boolean(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object like {\"include_usage\": true}")
        if not stream:
            raise bad("'stream_options' is only allowed with \"stream\": true")
        extra = sorted(set(opts) - {"include_usage"})
        if extra:
            raise bad(f"unknown field 'stream_options.{extra[0]}'")
        include_usage = boolean(opts, "include_usage")
    if chat:
        want = boolean(body, "logprobs")
        top = number(body, "top_logprobs", 0, int, 0, MAX_CHAT_TOP_LOGPROBS)
        if body.get("top_logprobs") is not None and not want:
            raise bad("'top_logprobs' needs \"logprobs\": true")
        logprobs = top if want else -1
        echo = False
    else:
        logprobs = (
            -1
            if body.get("logprobs") is None
            else number(body, "logprobs", 0, int, 0, MAX_COMPLETION_LOGPROBS)
        )
        echo = boolean(body, "echo")
    if logprobs >= 0 and stream:
        raise bad("'logprobs' with \"stream\": true is not supported by this server")
    return Sampling(
        max_tokens=n_tokens,
        temperature=number(body, "temperature", 1.0, float, 0.0, 5.0),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean no top-k cut
        top_p=number(body, "top_p", 1.0, float, 0.0, 1.0),
        stop=stop_strings(body),
        n=n,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        echo=echo,
    )


def prompts(body: dict, vocab_size: int, max_prompts: int) -> list[str | list[int]]:
    """The completion prompt(s): a string, a list of token ids (even one), or a list of either."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("'prompt' is required: a string, a list of token ids, or a list of those")
    prompt = body["prompt"]

    def ids_ok(p) -> bool:
        return isinstance(p, list) and bool(p) and all(_is_int(i) for i in p)

    if isinstance(prompt, str):
        out: list = [prompt]
    elif ids_ok(prompt):
        out = [prompt]
    elif (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt)
    ):
        out = list(prompt)
    else:
        raise bad(
            "'prompt' must be a string, a non-empty list of token ids, or a non-empty list of "
            f"those; got {json_preview(prompt)}"
        )
    if len(out) > max_prompts:
        raise bad(f"'prompt' holds {len(out)} prompts; at most {max_prompts} per request")
    for p in out:
        if isinstance(p, list) and (max(p) >= vocab_size or min(p) < 0):
            raise bad(f"token ids in 'prompt' must be in [0, {vocab_size}); got {min(p)}..{max(p)}")
    return out


def messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"'messages[{i}]' must be an object with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise bad(f"'messages[{i}].role' must be a string")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                     for p in content]  # fmt: skip
            if not all(isinstance(p, str) for p in parts):
                raise bad(f"'messages[{i}].content' parts must all be {{type: text, text: str}}")
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"'messages[{i}].content' must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def json_preview(x) -> str:
    import json

    try:
        text = json.dumps(x)
    except (TypeError, ValueError):
        text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."
