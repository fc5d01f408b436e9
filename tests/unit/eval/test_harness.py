"""lm-evaluation-harness: the lmtrain backend scores like lm-eval's own ``hf`` backend.

A tiny random Llama is saved with transformers, imported with ``lmtrain import hf``, and run
through ``lm_eval.simple_evaluate`` on three local tasks (tests/support/harness_tasks: multiple choice,
perplexity with rolling windows, generation with stop strings) by both backends. Some
documents are longer than the model's 64-token context, so left-truncation is exercised too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from lmtrain.eval import harness  # noqa: E402
from lmtrain.infer.loader import load_run  # noqa: E402
from lmtrain.interop.hf_import import import_hf  # noqa: E402
from tests.support.hf_tiny import save_model  # noqa: E402

REPO = str(Path(__file__).resolve().parents[3])
TASKS_DIR = os.path.join(REPO, "tests", "support", "harness_tasks")
TASKS = ["lmtrain_mc", "lmtrain_ppl", "lmtrain_gen"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    hf_dir, workdir = str(root / "hf"), str(root / "lm")
    save_model("llama", hf_dir, seed=3)
    import_hf(hf_dir, workdir, compute_dtype="float32")
    return hf_dir, workdir


@pytest.fixture
def offline(monkeypatch, tmp_path):
    # Task YAMLs name their data files relative to the repository root; nothing may go online.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def _evaluate(model, model_args=None):
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=harness.task_manager(TASKS_DIR),
        log_samples=True,
        bootstrap_iters=0,
    )


def _responses(out, task):
    """Per document (in doc order): the filtered responses of each of its requests."""
    docs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in docs]


def test_lmtrain_backend_matches_lm_eval_hf_backend(models, offline):
    hf_dir, workdir = models
    want = _evaluate("hf", f"pretrained={hf_dir},device=cpu,dtype=float32,batch_size=4")
    lm = harness.LmtrainLM(run=load_run(workdir), batch_size=4)
    got = _evaluate(lm)

    # Multiple choice: every choice's log-likelihood within 1e-4, same greedy flags, same acc.
    mc_want, mc_got = _responses(want, "lmtrain_mc"), _responses(got, "lmtrain_mc")
    assert len(mc_got) == 6 and sum(len(d) for d in mc_got) == 22
    for doc_w, doc_g in zip(mc_want, mc_got, strict=True):
        for (ll_w, greedy_w), (ll_g, greedy_g) in zip(doc_w, doc_g, strict=True):
            assert abs(float(ll_w) - float(ll_g)) < 1e-4, (ll_w, ll_g)
            assert greedy_w == greedy_g
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["lmtrain_mc"][metric] == want["results"]["lmtrain_mc"][metric]

    # Perplexity: per-document rolling log-likelihoods (one spans several windows).
    ppl_w, ppl_g = _responses(want, "lmtrain_ppl"), _responses(got, "lmtrain_ppl")
    assert len(ppl_g) == 3
    for (w,), (g,) in zip(ppl_w, ppl_g, strict=True):
        assert abs(float(w) - float(g)) < 1e-4 and float(g) < -10.0
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        w, g = want["results"]["lmtrain_ppl"][metric], got["results"]["lmtrain_ppl"][metric]
        assert abs(w - g) <= 1e-5 * abs(w), (metric, w, g)

    # Generation: the same greedy text, cut before the stop string, and the same score.
    gen_w, gen_g = _responses(want, "lmtrain_gen"), _responses(got, "lmtrain_gen")
    assert gen_g == gen_w
    assert all("," not in text and "\n" not in text for (text,) in gen_g)
    # Some rows ended at a stop string before max_gen_toks (12); others ran to the limit.
    lengths = [len(lm.tok.encode(text)) for (text,) in gen_g]
    assert min(lengths) < 12 and max(lengths) >= 10, lengths
    assert (
        got["results"]["lmtrain_gen"]["exact_match,none"]
        == want["results"]["lmtrain_gen"]["exact_match,none"]
    )


def test_registered_model_name_and_cli_writes_results_beside_report(models, offline, tmp_path):
    from lm_eval.api.registry import get_model

    from lmtrain.cli import main

    assert get_model("lmtrain") is harness.LmtrainLM
    _, workdir = models
    out = tmp_path / "ev"
    main(
        [
            "eval", "--harness", "--tasks", "lmtrain_mc,lmtrain_gen", "--checkpoint", workdir,
            "--include-path", TASKS_DIR, "--out", str(out),
        ]
    )  # fmt: skip
    results = json.loads((out / harness.RESULTS_FILE).read_text())
    assert set(results["results"]) == {"lmtrain_mc", "lmtrain_gen"}
    assert results["n-samples"]["lmtrain_mc"]["effective"] == 6
    report = json.loads((out / "report.json").read_text())
    acc = results["results"]["lmtrain_mc"]["acc,none"]
    assert report["harness"]["lmtrain_mc"] == {
        "acc": acc,
        "acc_norm": results["results"]["lmtrain_mc"]["acc_norm,none"],
        "n": 6,
    }
    md = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in md and "| lmtrain_mc | acc |" in md
