"""``lmtrain serve`` on a loopback port: completion, chat, SSE streaming, batching, limits, errors."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import base_config, to_json
from lmtrain.data.shards import write_split
from lmtrain.data.tokenizer import CHAT_SPECIALS, DEFAULT_SPECIALS, CharTokenizer
from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.interop.workdir import save_params
from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer
from lmtrain.serve.server import ServeLimits, Server, load_service
from lmtrain.train.run_loader import load_workdir

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n"))
VALIDATION_TEXT = (
    "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
) * 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """A random-weight char model with chat specials, saved as an lmtrain workdir."""
    wd = tmp_path_factory.mktemp("serve_model")
    tok = CharTokenizer(CHARS, list(DEFAULT_SPECIALS) + list(CHAT_SPECIALS))
    tok.save(wd / "tokenizer")
    cfg = base_config()
    cfg.model.update(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=64,
        dtype="float32",
    )
    cfg.data.dir = str(wd)
    (wd / "config.json").write_text(to_json(cfg))
    # A validation split: the drift reference on /metrics is measured on it at start-up.
    docs = [tok.encode(t) for t in VALIDATION_TEXT.split("\n") if t]
    write_split(wd / "validation", docs, vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    model = Transformer(ModelConfig.from_config(cfg.model))
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    params = jax.tree.map(
        lambda x: np.asarray(x) * 3.0, params
    )  # sharper logits: prompt-dependent output
    save_params(str(wd), params)
    return str(wd)


@pytest.fixture(scope="module")
def server(workdir):
    limits = ServeLimits(max_body_bytes=2000, max_tokens=32, timeout_s=30.0)
    srv = Server(
        load_service(workdir, max_batch=8, limits=limits, batch_window_s=0.3), port=0
    ).start()
    yield srv
    srv.close()


def post(server, path, body, raw: bytes | None = None, headers=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(
        "POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type"), resp.read()
    conn.close()
    return out


N = 8  # max_tokens everywhere, so compiled shapes are shared between tests


def greedy_reference(workdir, prompts: list[list[int]]) -> list[list[int]]:
    """lmtrain's own batched greedy generate (one compile for all prompts)."""
    lm = load_workdir(workdir)
    return generate(lm.model, lm.params, prompts, SamplingParams(N, lm.tokenizer.eos_id)).tokens


def test_health(server):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200 and body["status"] == "ok" and body["context"] == 64


def test_completion_matches_greedy_generate(server, workdir):
    tok = load_workdir(workdir).tokenizer
    status, ctype, data = post(
        server, "/v1/completions", {"prompt": "To be or not", "max_tokens": N, "temperature": 0}
    )
    assert status == 200 and ctype == "application/json"
    out = json.loads(data)
    want = greedy_reference(workdir, [tok.encode("To be or not")])[0]
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == tok.decode(want)
    assert out["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": len(want),
        "total_tokens": 12 + len(want),
    }
    assert out["choices"][0]["finish_reason"] == ("length" if len(want) == N else "stop")


def test_chat_uses_template_and_answers(server, workdir):
    from lmtrain.data.chat_template import ChatTemplate

    lm = load_workdir(workdir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    status, _, data = post(
        server, "/v1/chat/completions", {"messages": msgs, "max_tokens": N, "temperature": 0}
    )
    assert status == 200
    out = json.loads(data)
    prompt = ChatTemplate().encode_generation_prompt(
        [("system", "Be brief."), ("user", "Hi there")], lm.tokenizer
    )
    want = greedy_reference(workdir, [prompt])[0]
    end = lm.tokenizer.token_id("<|end|>")
    if end in want:
        want = want[: want.index(end)]
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": lm.tokenizer.decode(want),
    }
    assert out["usage"]["prompt_tokens"] == len(prompt)


def read_sse(server, path, body):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(
        "POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [
        line[len("data: ") :]
        for line in resp.read().decode().split("\n\n")
        if line.startswith("data: ")
    ]
    conn.close()
    return events


def test_streaming_completion_and_chat(server):
    body = {"prompt": "Hello", "max_tokens": N, "temperature": 0}
    events = read_sse(server, "/v1/completions", dict(body, stream=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3  # pieces arrive one by one, then the finish chunk
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    _, _, data = post(server, "/v1/completions", body)
    assert streamed == json.loads(data)["choices"][0]["text"]

    events = read_sse(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": N, "stream": True},
    )
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[0]["object"] == "chat.completion.chunk" and events[-1] == "[DONE]"


def test_concurrent_requests_are_batched(server, workdir):
    tok = load_workdir(workdir).tokenizer
    prompts = ["A", "Bee", "Cats sat", "Dogs ran far", "Eh"]
    before = dict(server.service.engine.stats)
    results = [None] * len(prompts)

    def run(i):
        results[i] = post(
            server, "/v1/completions", {"prompt": prompts[i], "max_tokens": N, "temperature": 0}
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stats = server.service.engine.stats
    assert stats["requests"] - before["requests"] == len(prompts)
    assert stats["batches"] - before["batches"] < len(prompts)  # at least two shared a batch
    assert stats["max_batch_size"] >= 2
    wants = greedy_reference(workdir, [tok.encode(p) for p in prompts])
    for want, (status, _, data) in zip(wants, results):
        assert status == 200
        assert json.loads(data)["choices"][0]["text"] == tok.decode(want)


@pytest.mark.parametrize(
    "raw,status,needle",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"max_tokens": 4}).encode(), 400, "'prompt'"),
        (json.dumps({"prompt": "hi", "max_tokens": 1000}).encode(), 400, "between 1 and 32"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "'temperature'"),
        (
            json.dumps({"prompt": "x" * 60, "max_tokens": 10}).encode(),
            400,
            "exceeds the model's context",
        ),
        (json.dumps({"prompt": "x" * 3000}).encode(), 413, "exceeds the limit of 2000 bytes"),
    ],
)
def test_bad_requests_get_clear_errors(server, raw, status, needle):
    got, ctype, data = post(server, "/v1/completions", None, raw=raw)
    assert got == status and ctype == "application/json"
    assert needle in json.loads(data)["error"]["message"]


def test_bad_chat_and_unknown_route(server):
    status, _, data = post(
        server, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}
    )
    assert status == 400 and "invalid 'messages'" in json.loads(data)["error"]["message"]
    status, _, _ = post(server, "/v1/embeddings", {"input": "x"})
    assert status == 404
    # The server is still healthy after all of that.
    status, _, data = post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2})
    assert status == 200


def test_time_limit_ends_generation(workdir):
    limits = ServeLimits(max_tokens=32, timeout_s=0.0)
    srv = Server(load_service(workdir, limits=limits), port=0).start()
    try:
        status, _, data = post(
            srv, "/v1/completions", {"prompt": "Slow", "max_tokens": 30, "temperature": 0}
        )
        out = json.loads(data)
        assert status == 200 and out["choices"][0]["finish_reason"] == "timeout"
        assert out["usage"]["completion_tokens"] < 30
    finally:
        srv.close()


def test_int8_service_decodes_with_dequantized_weights(workdir):
    from lmtrain.quant.int8 import dequantize_params, quantize_params

    lm = load_workdir(workdir)
    deq = jax.tree.map(np.asarray, dequantize_params(quantize_params(lm.params)))
    want = generate(lm.model, deq, [[5, 6, 7]], SamplingParams(N, lm.tokenizer.eos_id)).tokens[0]
    srv = Server(load_service(workdir, int8=True), port=0).start()
    try:
        status, _, data = post(
            srv, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": N, "temperature": 0}
        )
        assert status == 200
        assert json.loads(data)["choices"][0]["text"] == lm.tokenizer.decode(want)
    finally:
        srv.close()


# --- hardening (issue 22) and /metrics (issue 21) ------------------------------------------


def post_full(server, path, body=None, raw=None, headers=None):
    """(status, headers dict, parsed JSON or raw bytes)."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(
        "POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return resp.status, dict(resp.getheaders()), payload


def test_burst_of_200_gets_200_or_503_and_no_reset(server):
    """200 clients at once against a pool of 4 workers and 4 waiting slots: every one is
    answered (200, or 503 with Retry-After), none sees a reset or a dropped connection."""
    svc = server.service
    saved = svc.limits
    svc.limits = dataclasses.replace(saved, workers=4, max_pending=4, max_queue=8)
    burst = Server(svc, port=0).start()
    svc.limits = saved
    results: list = [None] * 200
    go = threading.Event()

    def client(i):
        go.wait(timeout=30)
        try:
            status, headers, body = post_full(
                burst, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
            )
            results[i] = (status, headers.get("Retry-After"), body)
        except Exception as e:  # noqa: BLE001 - a reset or drop is what this test looks for
            results[i] = ("exception", type(e).__name__, str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    try:
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        burst.httpd.shutdown()
        burst.httpd.server_close()  # the engine is the module server's; it stays up
    failures = [r for r in results if r is None or r[0] not in (200, 503)]
    assert not failures, failures[:5]
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert ok and busy, (len(ok), len(busy))
    assert all(r[1] == "1" and "busy" in r[2]["error"]["message"] for r in busy)
    assert all(r[2]["choices"][0]["text"] == ok[0][2]["choices"][0]["text"] for r in ok)


MALFORMED = [
    (b'{"prompt": "hi", "max_tokens": 1e400}', "'max_tokens'"),
    (b'{"prompt": "hi", "max_tokens": Infinity}', "'max_tokens'"),
    (b'{"prompt": "hi", "max_tokens": NaN}', "'max_tokens'"),
    (b'{"prompt": "hi", "max_tokens": true}', "'max_tokens'"),
    (b'{"prompt": "hi", "max_tokens": 2.5}', "'max_tokens'"),
    (b'{"prompt": "hi", "max_tokens": "4"}', "'max_tokens'"),
    (b'{"prompt": "hi", "top_k": 1e400}', "'top_k'"),
    (b'{"prompt": "hi", "temperature": -Infinity}', "'temperature'"),
    (b'{"prompt": "hi", "top_p": "0.5"}', "'top_p'"),
    (b'{"prompt": "hi", "top_p": 1.5}', "'top_p'"),
    (b'{"prompt": "hi", "stop": 5}', "'stop'"),
    (b'{"prompt": "hi", "stop": true}', "'stop'"),
    (b'{"prompt": "hi", "stop": [1]}', "'stop'"),
    (b'{"prompt": "hi", "stop": [""]}', "'stop'"),
    (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "'stop'"),
    (b'{"prompt": "hi", "n": 0}', "'n'"),
    (b'{"prompt": "hi", "n": 1e400}', "'n'"),
    (b'{"prompt": "hi", "n": 9}', "'n'"),
    (b'{"prompt": "hi", "logprobs": 6}', "'logprobs'"),
    (b'{"prompt": "hi", "logprobs": true}', "'logprobs'"),
    (b'{"prompt": "hi", "echo": "yes"}', "'echo'"),
    (b'{"prompt": "hi", "stream": "true"}', "'stream'"),
    (b'{"prompt": "hi", "stream_options": {"include_usage": true}}', "'stream_options'"),
    (
        b'{"prompt": "hi", "stream": true, "stream_options": {"include_usage": 1}}',
        "'include_usage'",
    ),
    (b'{"prompt": "hi", "stream": true, "logprobs": 1}', "'logprobs'"),
    (b'{"prompt": "hi", "seed": 1}', "'seed'"),
    (b'{"prompt": "hi", "presence_penalty": 1}', "'presence_penalty'"),
    (b'{"prompt": "hi", "best_of": 3}', "'best_of'"),
    (b'{"prompt": "hi", "max_token": 4}', "'max_token'"),
    (b'{"prompt": 5}', "'prompt'"),
    (b'{"prompt": []}', "'prompt'"),
    (b'{"prompt": [[]]}', "'prompt'"),
    (b'{"prompt": [1.5]}', "'prompt'"),
    (b'{"prompt": [true]}', "'prompt'"),
    (b'{"prompt": [-1]}', "'prompt'"),
    (b'{"prompt": [100000]}', "'prompt'"),
    (b'{"prompt": null}', "'prompt'"),
]
CHAT_MALFORMED = [
    (b'{"messages": "hi"}', "'messages'"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "'messages[0].content'"),
    (b'{"messages": [{"content": "x"}]}', "'messages[0].role'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}', "'logprobs'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "'top_logprobs'"),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}',
        "'top_logprobs'",
    ),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1e400}',
        "'max_completion_tokens'",
    ),  # fmt: skip
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": []}', "'tools'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "echo": true}', "'echo'"),
]


@pytest.mark.parametrize(
    "path,raw,field",
    [("/v1/completions", r, f) for r, f in MALFORMED]
    + [("/v1/chat/completions", r, f) for r, f in CHAT_MALFORMED],
)
def test_every_malformed_value_gets_400_naming_the_field(server, path, raw, field):
    status, _, body = post_full(server, path, raw=raw)
    assert status == 400, (raw, status, body)
    assert field in body["error"]["message"], (raw, body)


def completion(server, **body):
    status, _, out = post_full(server, "/v1/completions", dict(temperature=0, **body))
    assert status == 200, out
    return out


def test_multi_token_stop_string_cuts_the_text(server):
    """A stop string several tokens long, taken from the middle of the greedy output, ends the
    text right before it with finish_reason "stop", streamed or not."""
    full = None
    for prompt in ("To be or not", "Hello", "Cats sat", "A", "Bee"):
        text = completion(server, prompt=prompt, max_tokens=N)["choices"][0]["text"]
        if len(text) == N and text[2:5] and text.find(text[2:5]) == 2:
            full = text
            break
    assert full is not None, "no prompt gave a full-length greedy completion"
    stop = full[2:5]  # three characters: three tokens of the char tokenizer
    out = completion(server, prompt=prompt, max_tokens=N, stop=[stop, "unseen"])
    choice = out["choices"][0]
    assert choice["text"] == full[:2] and choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 5  # the stop string's tokens were generated
    events = read_sse(
        server,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": N, "temperature": 0, "stop": stop, "stream": True},
    )
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_single_id_prompt_n_echo_and_several_prompts(server, workdir):
    tok = load_workdir(workdir).tokenizer
    one = completion(server, prompt=[5], max_tokens=N)
    assert one["usage"]["prompt_tokens"] == 1
    assert one["choices"][0]["text"] == tok.decode(greedy_reference(workdir, [[5]])[0])

    prompts = ["A", "Bee"]
    out = completion(server, prompt=prompts, max_tokens=N, n=2, echo=True)
    wants = greedy_reference(workdir, [tok.encode(p) for p in prompts])
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for c in out["choices"]:
        p = prompts[c["index"] // 2]
        assert c["text"] == p + tok.decode(wants[c["index"] // 2])
    assert out["usage"]["prompt_tokens"] == 1 + 3
    assert out["usage"]["completion_tokens"] == 2 * sum(len(w) for w in wants)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_logprobs_match_the_models_distribution(server, workdir):
    """Completion logprobs (echo included) against a full forward pass done in numpy."""
    lm = load_workdir(workdir)
    tok = lm.tokenizer
    prompt = "Cats sat"
    out = completion(server, prompt=prompt, max_tokens=4, logprobs=3, echo=True)
    lp = out["choices"][0]["logprobs"]
    ids = tok.encode(prompt)
    gen = greedy_reference(workdir, [ids])[0][:4]
    seq = ids + gen
    logits = np.asarray(lm.model.apply({"params": lm.params}, np.asarray([seq], np.int32)))[0]
    ref = _log_softmax(logits)
    want = [None] + [ref[t, seq[t + 1]] for t in range(len(seq) - 1)]
    got = lp["token_logprobs"]
    assert len(got) == len(seq) and got[0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-4)
    for t in range(1, len(seq)):
        top = np.sort(ref[t - 1])[::-1][:3]  # pieces may collide as dict keys: compare values
        values = sorted(lp["top_logprobs"][t].values(), reverse=True)
        assert values[0] == pytest.approx(top[0], abs=1e-4)
        assert all(np.min(np.abs(top - v)) < 1e-4 for v in values)
    assert lp["tokens"] == [tok.decode([i]) for i in seq]
    assert lp["text_offset"] == list(range(len(seq)))

    status, _, chat = post_full(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
         "logprobs": True, "top_logprobs": 2},
    )  # fmt: skip
    assert status == 200
    content = chat["choices"][0]["logprobs"]["content"]
    assert content and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) for c in content)


def test_stream_include_usage(server):
    events = read_sse(
        server,
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": N, "temperature": 0, "n": 2, "stream": True,
         "stream_options": {"include_usage": True}},
    )  # fmt: skip
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])
    finished = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert finished == [0, 1]
    texts = ["".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i)
             for i in (0, 1)]  # fmt: skip
    assert last["usage"]["completion_tokens"] >= sum(len(t) for t in texts)  # specials: no text


def test_api_key_bearer(server):
    svc = server.service
    svc.api_key = "s3cret"
    body = {"prompt": "Hi", "max_tokens": 2}
    try:
        missing = post_full(server, "/v1/completions", body)
        wrong = post_full(server, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
        basic = post_full(server, "/v1/completions", body, headers={"Authorization": "s3cret"})
        right = post_full(
            server, "/v1/completions", body, headers={"Authorization": "Bearer s3cret"}
        )
        models = post_full(server, "/v1/chat/completions", {"messages": []})
    finally:
        svc.api_key = None
    assert missing[0] == 401 and "missing API key" in missing[2]["error"]["message"]
    assert missing[1]["WWW-Authenticate"] == "Bearer"
    assert wrong[0] == 401 and wrong[2]["error"]["message"] == "invalid API key"
    assert basic[0] == 401
    assert models[0] == 401  # checked before the body is looked at
    assert right[0] == 200 and right[2]["choices"][0]["text"] is not None


def test_cli_api_key_flag_env_and_exposure_warning(workdir, monkeypatch, capsys):
    import argparse

    from lmtrain.serve import cli
    from lmtrain.serve import server as server_mod

    seen = []

    def fake_forever(self):
        seen.append(self.service.api_key)
        raise KeyboardInterrupt

    monkeypatch.setattr(server_mod.Server, "serve_forever", fake_forever)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    base = ["serve", "--checkpoint", workdir, "--port", "0"]
    monkeypatch.setenv("LMTRAIN_API_KEY", "from-env")
    args = parser.parse_args(base)
    args.fn(args, [])
    args = parser.parse_args(base + ["--api-key", "from-flag"])
    args.fn(args, [])
    assert seen == ["from-env", "from-flag"]
    assert "API key required" in capsys.readouterr().out

    assert server_mod.exposure_warning("127.0.0.1", None) is None
    assert server_mod.exposure_warning("localhost", None) is None
    assert server_mod.exposure_warning("::1", None) is None
    assert server_mod.exposure_warning("0.0.0.0", "key") is None
    warning = server_mod.exposure_warning("0.0.0.0", None)
    assert "WITHOUT an API key" in warning and "--api-key" in warning


def scrape(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    text = resp.read().decode()
    conn.close()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_move_after_requests(server, workdir):
    """/metrics parsed with prometheus_client: counters and histograms advance by what the
    requests did; the drift histograms hold the validation reference and the prompts' own
    log-perplexity, checked against a numpy forward pass."""
    before = scrape(server)

    def get(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    prompt = "To be or not"
    completion(server, prompt=prompt, max_tokens=4)
    completion(server, prompt=prompt, max_tokens=4, n=2)  # one prompt, two rows
    post_full(server, "/v1/completions", raw=b'{"prompt": 5}')
    # A request's duration (and its generated tokens) are recorded after its last byte is
    # written, so the client can read the answer before the server's thread records them.
    duration = ("lmtrain_request_duration_seconds_count", (("endpoint", "/v1/completions"),))
    deadline = time.monotonic() + 30
    after = scrape(server)
    while after.get(duration, 0) - before.get(duration, 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = scrape(server)

    def delta(name, **labels):
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("lmtrain_requests_total", endpoint="/v1/completions", status="200") == 2
    assert delta("lmtrain_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("lmtrain_errors_total", kind="bad_request") == 1
    assert delta("lmtrain_prompt_tokens_total") == 2 * len(prompt)
    generated = delta("lmtrain_generated_tokens_total")
    assert 0 < generated <= 12
    assert delta("lmtrain_time_to_first_token_seconds_count") == 3  # one per row
    assert delta("lmtrain_time_to_first_token_seconds_sum") > 0
    assert delta("lmtrain_time_per_output_token_seconds_count") >= generated / 2
    assert delta("lmtrain_batch_size_count") >= 1
    assert ("lmtrain_queue_depth", ()) in after and ("lmtrain_open_connections", ()) in after
    assert delta("lmtrain_request_duration_seconds_count", endpoint="/v1/completions") == 3

    # Drift: each prompt's mean NLL per token under the model, as numpy computes it.
    lm = load_workdir(workdir)
    ids = lm.tokenizer.encode(prompt)
    logits = np.asarray(lm.model.apply({"params": lm.params}, np.asarray([ids], np.int32)))[0]
    nll = -np.mean([_log_softmax(logits[t])[ids[t + 1]] for t in range(len(ids) - 1)])
    assert delta("lmtrain_prompt_log_perplexity_count") == 2
    assert delta("lmtrain_prompt_log_perplexity_sum") == pytest.approx(2 * nll, rel=1e-4)
    ref_count = get(after, "lmtrain_reference_log_perplexity_count")
    assert ref_count == 32
    assert get(after, "lmtrain_reference_info", source="validation", windows="32",
               window_tokens="64") == 1  # fmt: skip
    from lmtrain.serve.drift import validation_windows

    rows, _ = validation_windows(workdir, "validation", count=32, length=64)
    logits = np.asarray(lm.model.apply({"params": lm.params}, np.asarray(rows, np.int32)))
    ref = sum(
        -np.mean([_log_softmax(lg[t])[row[t + 1]] for t in range(len(row) - 1)])
        for lg, row in zip(logits, rows)
    )
    assert get(after, "lmtrain_reference_log_perplexity_sum") == pytest.approx(ref, rel=1e-4)
