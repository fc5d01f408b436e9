"""`lmtrain eval` end to end on a tiny trained run, checked against independent computations."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.cli import main
from lmtrain.errors import ConfigError, DataError
from lmtrain.eval.cli import run_eval
from lmtrain.eval.suite import normalize_eval_config
from lmtrain.infer.loader import load_run
from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.train.loop import train
from tests.support.tiny import tiny_config

SOLUTION = "def add(a, b):\n    return a + b\n# "  # a one-line completion lands in the comment


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_text):
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_config(tiny_text, steps=8, eval_every=4, eval_batches=0)
    cfg.mesh.shape = (2, 1, 1)
    cfg.mesh.num_devices = 2
    train(cfg, workdir, print_fn=lambda *_: None)
    return workdir


def _logprobs(model, params, ids):
    logits = np.asarray(model.apply({"params": params}, jnp.asarray([ids[:-1]], jnp.int32)))[0]
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(ids) - 1), ids[1:]] - logz  # log p(ids[j+1] | ids[:j+1])


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.mark.slow  # end-to-end: a training run
def test_eval_report_matches_independent_computation(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_ALLOW_CODE_EXECUTION", "1")  # the suite has a code task
    run = load_run(trained)
    model, tok = run.setup.model, run.setup.tokenizer
    params = jax.device_get(run.params)

    docs = ["The quick brown fox.", "Return the value of x.", "a b c d e f g"]
    ppl_path = _write_jsonl(
        tmp_path / "docs.jsonl",
        [{"text": d, "kind": "short" if len(d) < 15 else "long"} for d in docs],
    )
    prompts = ["Return a new ", "The object is ", "Read the file ", "If the value "]
    greedy = [
        tok.decode(g)
        for g in generate(
            model, params, [tok.encode(p) for p in prompts], SamplingParams(6, tok.eos_id)
        ).tokens
    ]
    gen_rows = [
        {
            "prompt": p,
            "reference": g if i % 2 == 0 else "zzzzzz",
            "kind": "match" if i % 2 == 0 else "mismatch",
        }
        for i, (p, g) in enumerate(zip(prompts, greedy))
    ]
    gen_path = _write_jsonl(tmp_path / "gen.jsonl", gen_rows)
    choice_rows = [
        {"prompt": "The ", "choices": ["value", "xqzj"], "label": 0},
        {"prompt": "Return ", "choices": ["the", "zzz", "object"], "label": "object"},
    ]
    choice_path = _write_jsonl(tmp_path / "choice.jsonl", choice_rows)
    code_rows = [
        {"task_id": "ok", "prompt": SOLUTION, "test": "assert add(2, 3) == 5"},
        {"task_id": "bad", "prompt": SOLUTION, "test": "assert add(2, 3) == 6"},
    ]
    code_path = _write_jsonl(tmp_path / "code.jsonl", code_rows)
    leak_prefix = "Return the "
    leaked = leak_prefix + tok.decode(
        generate(model, params, [tok.encode(leak_prefix)], SamplingParams(12, tok.eos_id)).tokens[0]
    )
    from lmtrain.data.shards import TokenStream

    n_val = len(TokenStream(os.path.join(run.setup.data_dir, "validation")))
    seq = run.setup.config.data.seq_len
    split_tokens = 1 + seq * ((n_val - 1) // seq)  # the training eval's whole windows only
    cfg_path = tmp_path / "eval_cfg.py"
    cfg_path.write_text(f"""
import ml_collections
def get_config():
    c = ml_collections.ConfigDict()
    c.title = "tiny"
    c.batch_size = 4
    c.tasks = [
        dict(name="split", kind="perplexity", split="validation", max_tokens={split_tokens}),
        dict(name="docs", kind="perplexity", path={ppl_path!r}, slices=["kind"]),
        dict(name="gen", kind="generation", path={gen_path!r}, slices=["kind"], max_new_tokens=6,
             metrics=["exact_match", "token_f1", "rouge_l", "bleu", "accuracy"]),
        dict(name="choice", kind="choice", path={choice_path!r}),
        dict(name="code", kind="code", path={code_path!r}, num_samples=2, ks=[1, 2],
             stop=["\\n"], max_new_tokens=8, timeout_s=10.0),
    ]
    c.safety = dict(
        refusal=dict(max_new_tokens=4, max_examples=6),
        canaries=dict(canaries=[{leaked!r}, "zq9 secret 1234 zq9 secret"],
                      prompt_chars={len(leak_prefix)}, max_new_tokens=12),
        bias=dict(templates=["The {{group}} is here."], groups={{"pets": ["cat", "dog"]}}),
    )
    c.latency = dict(batch_sizes=[1, 2], prompt_tokens=8, new_tokens=4, repeats=1)
    return c
""")
    out = tmp_path / "report"
    report = run_eval(trained, str(cfg_path), str(out), print_fn=lambda *_: None)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"]["docs"]["metrics"] == pytest.approx(report["tasks"]["docs"]["metrics"])
    tasks = on_disk["tasks"]

    # Held-out split: the same number the training loop logged for its final full-split eval.
    rows = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
    final_eval = [r for r in rows if "eval_full/loss" in r][-1]
    assert tasks["split"]["metrics"]["nll_per_token"] == pytest.approx(
        final_eval["eval_full/loss"], rel=2e-6
    )
    # Documents: summed NLL from a plain forward pass and numpy log-softmax.
    nll = {d: -_logprobs(model, params, tok.encode(d)).sum() for d in docs}
    ntok = {d: len(tok.encode(d)) - 1 for d in docs}
    nbytes = {d: len(d[1:].encode()) for d in docs}  # char tokenizer: first char is context
    total_nll, total_tok = sum(nll.values()), sum(ntok.values())
    m = tasks["docs"]["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(total_nll / total_tok), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(
        total_nll / sum(nbytes.values()) / math.log(2), rel=1e-4
    )
    short = [d for d in docs if len(d) < 15]
    assert tasks["docs"]["slices"]["kind"]["short"]["metrics"]["perplexity"] == pytest.approx(
        math.exp(sum(nll[d] for d in short) / sum(ntok[d] for d in short)), rel=1e-4
    )
    # Generation: references equal to greedy output score 1, the others 0.
    g = tasks["gen"]
    assert g["slices"]["kind"]["match"]["metrics"]["exact_match"] == 1.0
    assert g["slices"]["kind"]["mismatch"]["metrics"]["exact_match"] == 0.0
    assert g["metrics"]["exact_match"] == 0.5 and g["metrics"]["accuracy"] == 0.5
    assert g["slices"]["kind"]["match"]["metrics"]["token_f1"] == 1.0
    # Choice: argmax of summed log-likelihood computed independently.
    want = []
    for r in choice_rows:
        ctx = tok.encode(r["prompt"])
        scores = [
            _logprobs(model, params, ctx + tok.encode(c))[len(ctx) - 1 :].sum()
            for c in r["choices"]
        ]
        label = r["label"] if isinstance(r["label"], int) else r["choices"].index(r["label"])
        want.append(float(np.argmax(scores) == label))
    assert tasks["choice"]["metrics"]["accuracy"] == pytest.approx(np.mean(want))
    # Code: the passing problem passes every sample, the failing one none.
    assert tasks["code"]["metrics"] == {"pass@1": 0.5, "pass@2": 0.5}
    assert tasks["code"]["per_problem"]["ok"]["c"] == 2
    assert tasks["code"]["per_problem"]["bad"]["statuses"] == ["failed", "failed"]
    # Safety: the canary built from the model's own greedy continuation leaks, the other not.
    s = on_disk["safety"]
    assert s["canaries"]["exact_leaks"] == 1 and s["canaries"]["leaked"] == [leaked]
    assert s["refusal"]["num_prompts"] == 6 and set(s["refusal"]) >= {"precision", "recall"}
    head_scores = {}
    for group in ("cat", "dog"):
        ctx, tail = tok.encode(f"The {group}"), tok.encode(" is here.")
        head_scores[group] = _logprobs(model, params, ctx + tail)[len(ctx) - 1 :].mean()
    gap = abs(head_scores["cat"] - head_scores["dog"])
    assert s["bias"]["max_gap"] == pytest.approx(gap, rel=1e-4, abs=1e-6)
    # Latency rows, plots and markdown.
    lat = on_disk["latency"]
    assert set(lat) == {"batch_1", "batch_2"}
    assert lat["batch_2"]["new_tokens"] == 4 and lat["batch_1"]["tokens_per_s"] > 0
    assert lat["batch_1"]["time_to_first_token_ms"] > 0 and lat["batch_1"]["peak_memory_mb"] > 0
    png = (out / on_disk["plots"]["loss"]).read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "slices/gen/kind" in on_disk["plots"]
    md = (out / "report.md").read_text()
    assert "## Task: gen" in md and "## Latency" in md and "![Training and validation loss]" in md


@pytest.mark.slow  # end-to-end: a training run
def test_compare_cli_flags_regressions(trained, tmp_path, capsys):
    a = {
        "tasks": {"t": {"metrics": {"perplexity": 5.0, "accuracy": 0.5}, "n": 3}},
        "latency": {"batch_1": {"tokens_per_s": 100.0, "batch_size": 1}},
    }
    b = {
        "tasks": {"t": {"metrics": {"perplexity": 6.0, "accuracy": 0.75}, "n": 3}},
        "latency": {"batch_1": {"tokens_per_s": 50.0, "batch_size": 1}},
    }
    for name, rep in (("a", a), ("b", b)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "report.json").write_text(json.dumps(rep))
    main(
        [
            "eval",
            "--compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "cmp.md"),
        ]
    )
    table = capsys.readouterr().out
    assert "**2 regression(s)** in 3 metrics" in table
    assert "| tasks/t/perplexity | 5.0000 | 6.0000 | +1 (+20.0%) | ↑ ⚠ regression |" in table
    assert "| tasks/t/accuracy | 0.5000 | 0.7500 | +0.25 (+50.0%) | ↑ improved |" in table
    assert (tmp_path / "cmp.md").read_text() == table.rstrip("\n") + "\n"
    with pytest.raises(SystemExit) as e:
        main(
            ["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--fail-on-regression"]
        )
    assert e.value.code == 1


def test_eval_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="tasks\\[0\\].kind='ppl'"):
        normalize_eval_config({"tasks": [{"name": "x", "kind": "ppl"}]})
    with pytest.raises(ConfigError, match="unknown key 'metric' in tasks\\[0\\].*did you mean"):
        normalize_eval_config(
            {"tasks": [{"name": "x", "kind": "generation", "path": "a", "metric": ["bleu"]}]}
        )
    with pytest.raises(ConfigError, match="exactly one of split or path"):
        normalize_eval_config({"tasks": [{"name": "x", "kind": "perplexity"}]})
    with pytest.raises(ConfigError, match="metrics \\['meteor'\\] invalid"):
        normalize_eval_config(
            {"tasks": [{"name": "x", "kind": "generation", "path": "a", "metrics": ["meteor"]}]}
        )
    with pytest.raises(ConfigError, match="needs canaries"):
        normalize_eval_config({"safety": {"canaries": {}}})


@pytest.mark.slow  # end-to-end: a training run
def test_eval_missing_data_file_is_a_data_error(trained, tmp_path):
    cfg_path = tmp_path / "c.py"
    cfg_path.write_text(
        "def get_config():\n    import ml_collections\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.tasks = [dict(name='g', kind='generation', path='/nope.jsonl')]\n"
        "    return c\n"
    )
    with pytest.raises(DataError, match="/nope.jsonl"):
        run_eval(trained, str(cfg_path), str(tmp_path / "o"), print_fn=lambda *_: None)


@pytest.mark.slow  # end-to-end: a training run
def test_generate_cli_prompt_and_interactive(trained, capsys, monkeypatch):
    main(
        [
            "generate",
            "--checkpoint",
            trained,
            "--prompt",
            "The ",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--num-samples",
            "2",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("The ") and out[1] in ("--- [length]", "--- [eos]")
    assert out[2] == out[0]  # greedy: both samples agree
    answers = iter(["Return ", "If "])

    def fake_input(_prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    main(["generate", "--checkpoint", trained, "--max-new-tokens", "4", "--stop", "e"])
    lines = capsys.readouterr().out.splitlines()
    texts = [line for line in lines[:-1] if not line.startswith("---")]
    assert [t.split(" ")[0] for t in texts] == ["Return", "If"]
    for t in texts:  # a stop string never appears in what was generated
        assert "e" not in t[len(t.split(" ")[0]) + 1 :]
