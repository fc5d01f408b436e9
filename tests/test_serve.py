"""``lmtrain serve`` on a loopback port: completion, chat, SSE streaming, batching, limits, errors."""

from __future__ import annotations

import http.client
import json
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import base_config, to_json
from lmtrain.data.tokenizer import CHAT_SPECIALS, DEFAULT_SPECIALS, CharTokenizer
from lmtrain.infer.sampling import generate
from lmtrain.interop.workdir import load_workdir, save_params
from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer
from lmtrain.serve.server import ServeLimits, Server, load_service

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n"))


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
    return generate(lm.model, lm.params, prompts, max_new_tokens=N, eos_id=lm.tokenizer.eos_id)


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
    assert status == 400 and "invalid messages" in json.loads(data)["error"]["message"]
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
    want = generate(lm.model, deq, [[5, 6, 7]], max_new_tokens=N, eos_id=lm.tokenizer.eos_id)[0]
    srv = Server(load_service(workdir, int8=True), port=0).start()
    try:
        status, _, data = post(
            srv, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": N, "temperature": 0}
        )
        assert status == 200
        assert json.loads(data)["choices"][0]["text"] == lm.tokenizer.decode(want)
    finally:
        srv.close()
