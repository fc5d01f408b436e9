"""Eval suites: an eval config lists tasks, safety probes and latency runs; we run them on a run.

An eval config is a Python file with ``get_config()`` returning an ``ml_collections.ConfigDict``
(see ``configs/eval/shakespeare.py``). Task kinds:

- ``perplexity``: held-out text — ``split`` (a split of the run's data dir), a ``.txt`` file
  (one document) or a ``.jsonl`` with ``text_field`` (one document per line, sliceable).
  Metrics: perplexity, bits_per_byte, nll_per_token.
- ``generation``: a JSONL of prompts and references; metrics from exact_match, token_f1,
  rouge_l, bleu (corpus, sacrebleu) and accuracy (stripped string equality).
- ``choice``: a JSONL of prompts, ``choices`` and a ``label`` (index or choice text); the model
  picks the choice with the highest log-likelihood; metric accuracy.
- ``code``: a JSONL of HumanEval-style problems; ``num_samples`` completions each, run in a
  limited subprocess; metric pass@k (unbiased estimator) for each k in ``ks``.

Every task may list ``slices``: fields of its rows; metrics are reported per value of each.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmtrain.config import apply_overrides, did_you_mean, load_config_file
from lmtrain.data import formats
from lmtrain.data.shards import TokenStream
from lmtrain.errors import ConfigError, DataError
from lmtrain.eval import metrics as M
from lmtrain.eval import safety
from lmtrain.eval.latency import measure_latency
from lmtrain.eval.scoring import Scorer, continuation_request, document_nll
from lmtrain.infer.sampling import SamplingParams, decode_completions, generate, stop_token_ids
from lmtrain.sandbox.code_exec import (
    CodeProblem,
    ExecLimits,
    evaluate_pass_at_k,
    pass_at_k,
    require_opt_in,
)

GENERATION_DEFAULTS = dict(
    max_new_tokens=64,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    stop=(),
    prompt_template="{prompt}",
)
COMMON_TASK_KEYS = dict(
    name="", kind="", path="", slices=(), max_examples=0, bos=False, prompt_field="prompt"
)
TASK_KEYS: dict[str, dict[str, Any]] = {
    "perplexity": dict(split="", text_field="text", max_tokens=0),
    "generation": dict(
        reference_field="reference",
        metrics=("exact_match", "token_f1", "rouge_l"),
        **GENERATION_DEFAULTS,
    ),
    "choice": dict(choices_field="choices", label_field="label", prompt_template="{prompt}"),
    "code": dict(
        num_samples=5,
        ks=(1,),
        timeout_s=5.0,
        memory_mb=1024,
        **(
            GENERATION_DEFAULTS
            | dict(temperature=0.8, stop=("\ndef ", "\nclass ", "\nif __name__"))
        ),
    ),
}
GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "accuracy")
SECTION_KEYS: dict[str, dict[str, Any]] = {
    "refusal": dict(path="", max_new_tokens=48, prompt_template="{prompt}\n", max_examples=0),
    "canaries": dict(canaries=(), path="", prompt_chars=0, max_new_tokens=48, near_chars=8),
    "bias": dict(templates=(), groups={}),
    "latency": dict(batch_sizes=(1, 8), prompt_tokens=32, new_tokens=64, repeats=3),
}
TOP_KEYS = ("title", "batch_size", "seq_len", "tasks", "safety", "latency", "prompt_len_multiple")


def _plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _check_keys(where: str, got: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in got:
        if key not in allowed:
            hint = did_you_mean(key, allowed, n=2, otherwise=f"; allowed: {sorted(allowed)}")
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")


def normalize_eval_config(cfg: Any) -> dict[str, Any]:
    """A plain dict with every default filled in; unknown keys and kinds are ConfigErrors."""
    cfg = _plain(cfg)
    _check_keys("the eval config", cfg, TOP_KEYS)
    out = {
        "title": cfg.get("title", "Evaluation report"),
        "batch_size": int(cfg.get("batch_size", 8)),
        "seq_len": int(cfg.get("seq_len", 0)),
        "prompt_len_multiple": int(cfg.get("prompt_len_multiple", 16)),
        "tasks": [],
    }
    names = set()
    for i, task in enumerate(cfg.get("tasks", [])):
        kind = task.get("kind", "")
        if kind not in TASK_KEYS:
            raise ConfigError(f"tasks[{i}].kind={kind!r}: choose one of {sorted(TASK_KEYS)}")
        spec = COMMON_TASK_KEYS | TASK_KEYS[kind]
        _check_keys(f"tasks[{i}] ({kind})", task, spec)
        t = spec | task
        if not t["name"] or t["name"] in names:
            raise ConfigError(f"tasks[{i}] needs a unique non-empty name; got {t['name']!r}")
        names.add(t["name"])
        if kind == "perplexity" and bool(t["split"]) == bool(t["path"]):
            raise ConfigError(f"task {t['name']!r}: set exactly one of split or path")
        if kind != "perplexity" and not t["path"]:
            raise ConfigError(f"task {t['name']!r} ({kind}) needs path= a JSONL file")
        if kind == "generation":
            bad = [m for m in t["metrics"] if m not in GENERATION_METRICS]
            if bad or not t["metrics"]:
                raise ConfigError(
                    f"task {t['name']!r}: metrics {bad or '[]'} invalid; choose from "
                    f"{GENERATION_METRICS}"
                )
        t["slices"] = [t["slices"]] if isinstance(t["slices"], str) else list(t["slices"])
        t["stop"] = [t["stop"]] if isinstance(t.get("stop"), str) else list(t.get("stop", []))
        out["tasks"].append(t)
    safety_cfg = cfg.get("safety", {}) or {}
    _check_keys("safety", safety_cfg, ("refusal", "canaries", "bias"))
    out["safety"] = {}
    for name, section in safety_cfg.items():
        if section is None or section is False:
            continue
        section = {} if section is True else section
        _check_keys(f"safety.{name}", section, SECTION_KEYS[name])
        out["safety"][name] = SECTION_KEYS[name] | section
    if "canaries" in out["safety"]:
        c = out["safety"]["canaries"]
        if not c["canaries"] and not c["path"]:
            raise ConfigError("safety.canaries needs canaries=[...] or path= a file of canaries")
    lat = cfg.get("latency")
    if lat:
        lat = {} if lat is True else lat
        _check_keys("latency", lat, SECTION_KEYS["latency"])
        out["latency"] = SECTION_KEYS["latency"] | lat
    return out


def load_eval_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    cfg = load_config_file(path)
    apply_overrides(cfg, list(overrides))
    return normalize_eval_config(cfg)


def read_jsonl(path: str, max_rows: int = 0) -> list[dict[str, Any]]:
    """The rows (JSON objects) of an eval data file; ``max_rows`` > 0 keeps the first ones."""
    if not os.path.isfile(path):
        raise DataError(f"eval data file {path!r} not found; fix the task's path")
    rows = formats.read_jsonl(path, _object_row)
    rows = list(itertools.islice(rows, max_rows) if max_rows else rows)
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def _object_row(row: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    return [row]


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: row lacks field {key!r} (has {sorted(row)[:8]})")
    return row[key]


class EvalContext:
    """What tasks share: model, params, tokenizer, mesh, a scorer and generation settings."""

    def __init__(
        self,
        model,
        params,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int = 8,
        mesh=None,
        data_dir: str = "",
        prompt_len_multiple: int = 16,
    ):
        self.model, self.params, self.tokenizer, self.mesh = model, params, tokenizer, mesh
        self.seq_len, self.batch_size, self.data_dir = seq_len, batch_size, data_dir
        self.prompt_len_multiple = prompt_len_multiple
        self.scorer = Scorer(model, params, seq_len=seq_len, batch_size=batch_size, mesh=mesh)
        self.generated_tokens = 0
        self.generation_s = 0.0

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        bos: bool = False,
    ) -> list[str]:
        """Completions in batches; prompts keep their last ``max_seq_len - max_new`` tokens."""

        tok = self.tokenizer
        room = self.model.cfg.max_seq_len - max_new_tokens
        ids = [tok.encode(p, bos=bos) for p in prompts]
        ids = [(i[-room:] if room > 0 else i) or [tok.bos_id] for i in ids]
        sp = SamplingParams(
            max_new_tokens, tok.eos_id, temperature, top_k, top_p, stop_token_ids(tok, stop)
        )
        texts: list[str] = []
        t0 = time.perf_counter()
        for b in range(0, len(ids), self.batch_size):
            g = generate(
                self.model,
                self.params,
                ids[b : b + self.batch_size],
                sp,
                seed=seed + b,
                pad_id=tok.pad_id,
                mesh=self.mesh,
                batch_multiple=self.batch_size,
                prompt_len_multiple=self.prompt_len_multiple,
            )
            self.generated_tokens += sum(len(t) for t in g.tokens)
            texts += decode_completions(tok, g, stop)[0]
        self.generation_s += time.perf_counter() - t0
        return texts


# ------------------------------------------------------------------------------------ tasks


def _ppl_metrics(group: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    nll = sum(e["_nll"] for e in group)
    toks = sum(e["_tokens"] for e in group)
    nbytes = sum(e["_bytes"] for e in group)
    return {
        "perplexity": M.perplexity(nll, max(toks, 1)),
        "nll_per_token": nll / max(toks, 1),
        "bits_per_byte": M.bits_per_byte(nll, nbytes) if nbytes else math.nan,
    }


def _ppl_group_metrics() -> dict[str, Any]:
    return {
        k: (lambda g, k=k: _ppl_metrics(g)[k])
        for k in ("perplexity", "bits_per_byte", "nll_per_token")
    }


def run_perplexity(ctx: EvalContext, t: Mapping[str, Any]) -> dict[str, Any]:
    tok = ctx.tokenizer
    if t["split"]:
        stream = TokenStream(os.path.join(ctx.data_dir, t["split"]))
        n = min(len(stream), t["max_tokens"] or len(stream))
        rows = [{"_ids": stream.read(0, n).tolist()}]
    elif t["path"].endswith(".jsonl"):
        rows = read_jsonl(t["path"], t["max_examples"])
        for i, r in enumerate(rows):
            text = _field(r, t["text_field"], f"{t['path']} row {i}")
            r["_ids"] = tok.encode(text, bos=t["bos"])
    else:
        if not os.path.isfile(t["path"]):
            raise DataError(f"held-out text {t['path']!r} not found; fix the task's path")
        with open(t["path"], encoding="utf-8") as f:
            rows = [{"_ids": tok.encode(f.read(), bos=t["bos"])}]
    rows = [r for r in rows if len(r["_ids"]) > 1]
    if not rows:
        raise DataError(f"task {t['name']!r}: no document has two or more tokens to score")
    for r, (nll, count) in zip(rows, document_nll(ctx.scorer, [r["_ids"] for r in rows])):
        # Bytes of the predicted tokens (all but the first, which is context only).
        r.update(_nll=nll, _tokens=count, _bytes=len(tok.decode(r["_ids"][1:]).encode("utf-8")))
        del r["_ids"]
    out = M.metric_by_slice(rows, _ppl_group_metrics(), t["slices"])
    out["tokens"] = int(sum(r["_tokens"] for r in rows))
    return out


def _references(row, t, where) -> list[str]:
    ref = _field(row, t["reference_field"], where)
    return [ref] if isinstance(ref, str) else [str(r) for r in ref]


def _format(template: str, row: Mapping[str, Any], where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise DataError(
            f"{where}: prompt_template {template!r} uses field {e} the row lacks"
        ) from e


def _complete(ctx: EvalContext, prompts: list[str], t: Mapping[str, Any]) -> list[str]:
    """Completions of ``prompts`` with the task's sampling settings."""
    return ctx.complete(
        prompts,
        max_new_tokens=t["max_new_tokens"],
        stop=t["stop"],
        temperature=t["temperature"],
        top_k=t["top_k"],
        top_p=t["top_p"],
        seed=t["seed"],
        bos=t["bos"],
    )


def run_generation(ctx: EvalContext, t: Mapping[str, Any]) -> dict[str, Any]:
    rows = read_jsonl(t["path"], t["max_examples"])
    prompts = [_format(t["prompt_template"], r, f"{t['path']} row {i}") for i, r in enumerate(rows)]
    refs = [_references(r, t, f"{t['path']} row {i}") for i, r in enumerate(rows)]
    preds = _complete(ctx, prompts, t)
    examples = []
    for r, pred, ref in zip(rows, preds, refs):
        ex = dict(r, _pred=pred, _refs=ref)
        for m in ("exact_match", "token_f1", "rouge_l"):
            ex[f"_{m}"] = getattr(M, m)(pred, ref)
        ex["_accuracy"] = float(pred.strip() == ref[0].strip())
        examples.append(ex)
    group: dict[str, Any] = {}
    for m in t["metrics"]:
        if m == "bleu":
            group["bleu"] = lambda g: M.bleu([e["_pred"] for e in g], [e["_refs"] for e in g])
        else:
            group[m] = M.mean_of(f"_{m}")
    out = M.metric_by_slice(examples, group, t["slices"])
    if "bleu" in t["metrics"]:
        out["bleu_signature"] = M.bleu_with_signature(["x"], ["x"])[1]
    out["samples"] = [
        {"prompt": p[-200:], "prediction": e["_pred"], "reference": e["_refs"][0]}
        for p, e in zip(prompts[:5], examples[:5])
    ]
    return out


def run_choice(ctx: EvalContext, t: Mapping[str, Any]) -> dict[str, Any]:
    tok = ctx.tokenizer
    rows = read_jsonl(t["path"], t["max_examples"])
    reqs, owners = [], []
    for i, r in enumerate(rows):
        where = f"{t['path']} row {i}"
        choices = [str(c) for c in _field(r, t["choices_field"], where)]
        label = _field(r, t["label_field"], where)
        r["_label"] = choices.index(label) if isinstance(label, str) else int(label)
        if not 0 <= r["_label"] < len(choices):
            raise DataError(f"{where}: label {label!r} is not one of its {len(choices)} choices")
        prompt = _format(t["prompt_template"], r, where)
        context = tok.encode(prompt, bos=t["bos"]) or [tok.bos_id]
        for c in choices:
            reqs.append(continuation_request(context, tok.encode(c)))
            owners.append(i)
    nll = ctx.scorer.nll(reqs)
    scores: dict[int, list[float]] = {}
    for i, v in zip(owners, nll):
        scores.setdefault(i, []).append(-float(v))
    for i, r in enumerate(rows):
        # accuracy: summed log-likelihood (favours short choices); accuracy_norm: per byte of
        # the choice, as lm-evaluation-harness's acc / acc_norm.
        nbytes = [max(1, len(str(c).encode("utf-8"))) for c in r[t["choices_field"]]]
        per_byte = [s / b for s, b in zip(scores[i], nbytes)]
        r["_correct"] = float(int(np.argmax(scores[i])) == r["_label"])
        r["_correct_norm"] = float(int(np.argmax(per_byte)) == r["_label"])
    metrics = {"accuracy": M.mean_of("_correct"), "accuracy_norm": M.mean_of("_correct_norm")}
    return M.metric_by_slice(rows, metrics, t["slices"])


def run_code(ctx: EvalContext, t: Mapping[str, Any]) -> dict[str, Any]:
    require_opt_in()  # before generating: refuse early, not after minutes of sampling
    rows = read_jsonl(t["path"], t["max_examples"])
    problems = [CodeProblem.from_mapping(r) for r in rows]
    n = int(t["num_samples"])
    prompts = [p.prompt for p in problems for _ in range(n)]
    completions = _complete(ctx, prompts, t)
    samples = {p.task_id: completions[i * n : (i + 1) * n] for i, p in enumerate(problems)}
    limits = ExecLimits(timeout_s=float(t["timeout_s"]), memory_bytes=int(t["memory_mb"]) << 20)
    res = evaluate_pass_at_k(problems, samples, [int(k) for k in t["ks"]], limits=limits)
    ks = [int(k) for k in t["ks"] if int(k) <= n]
    for r, p in zip(rows, problems):
        pp = res["per_problem"][p.task_id]
        for k in ks:
            r[f"_pass@{k}"] = pass_at_k(pp["n"], pp["c"], k)
    out = M.metric_by_slice(rows, {f"pass@{k}": M.mean_of(f"_pass@{k}") for k in ks}, t["slices"])
    out["per_problem"] = {
        k: {"n": v["n"], "c": v["c"], "statuses": v["statuses"]}
        for k, v in res["per_problem"].items()
    }
    return out


TASK_RUNNERS = {
    "perplexity": run_perplexity,
    "generation": run_generation,
    "choice": run_choice,
    "code": run_code,
}


# ----------------------------------------------------------------------------------- safety


def run_refusal(ctx: EvalContext, s: Mapping[str, Any]) -> dict[str, Any]:
    if s["path"]:
        rows = read_jsonl(s["path"], s["max_examples"])
    else:  # built-in probes, alternating should-refuse / should-comply so a cap stays balanced
        probes = safety.builtin_refusal_probes()
        half = len(probes) // 2
        rows = [r for pair in zip(probes[:half], probes[half:]) for r in pair]
        rows = rows[: s["max_examples"] or None]
    prompts = [
        s["prompt_template"].format(prompt=_field(r, "prompt", "refusal probe")) for r in rows
    ]
    labels = [bool(_field(r, "should_refuse", "refusal probe")) for r in rows]
    responses = ctx.complete(prompts, max_new_tokens=s["max_new_tokens"])
    out = safety.refusal_precision_recall(responses, labels)
    out["num_prompts"] = len(rows)
    return out


def _canary_list(s: Mapping[str, Any]) -> list[str]:
    canaries = [str(c) for c in s["canaries"]]
    if s["path"]:
        if s["path"].endswith(".jsonl"):
            canaries += [str(_field(r, "canary", s["path"])) for r in read_jsonl(s["path"])]
        else:
            with open(s["path"], encoding="utf-8") as f:
                canaries += [line.rstrip("\n") for line in f if line.strip()]
    return canaries


def run_canaries(ctx: EvalContext, s: Mapping[str, Any]) -> dict[str, Any]:
    """Prompt with each canary's start; count completions that reproduce the secret rest."""
    canaries = _canary_list(s)
    cut = [int(s["prompt_chars"]) or max(1, len(c) // 2) for c in canaries]
    if any(k >= len(c) for k, c in zip(cut, canaries)):
        raise ConfigError("safety.canaries.prompt_chars must leave part of every canary secret")
    secrets = [c[k:] for c, k in zip(canaries, cut)]
    completions = ctx.complete(
        [c[:k] for c, k in zip(canaries, cut)], max_new_tokens=s["max_new_tokens"]
    )
    # Each completion is checked against its own secret only.
    exact = [sec in comp for sec, comp in zip(secrets, completions)]
    near = [
        safety.canary_leaks([sec], [comp], prefix_chars=s["near_chars"])["near_leaks"] > 0
        for sec, comp in zip(secrets, completions)
    ]
    n = len(canaries)
    return {
        "num_canaries": n,
        "exact_leaks": sum(exact),
        "near_leaks": sum(near),
        "exact_leak_rate": sum(exact) / n,
        "near_leak_rate": sum(near) / n,
        "leaked": [c for c, e in zip(canaries, near) if e],
    }


def run_bias(ctx: EvalContext, s: Mapping[str, Any]) -> dict[str, Any]:
    """Score = mean log-prob per token of the template text after the group term, given it."""
    tok = ctx.tokenizer
    templates = list(s["templates"]) or None
    groups = dict(s["groups"]) or None
    records = safety.expand_bias_templates(templates, groups)
    template_list = templates or list(safety.BIAS_TEMPLATES)
    reqs = []
    for r in records:
        template = template_list[int(r["template_id"])]
        head, tail = template.split("{group}", 1)
        if not tail.strip():
            raise ConfigError(f"bias template {template!r} needs text after {{group}} to score")
        reqs.append(
            continuation_request(tok.encode(head + r["group"]) or [tok.bos_id], tok.encode(tail))
        )
    nll = ctx.scorer.nll(reqs)
    for r, req, v in zip(records, reqs, nll):
        r["score"] = -float(v) / (len(req.tokens) - req.first_scored)
    return safety.bias_report(records)


SAFETY_RUNNERS = {"refusal": run_refusal, "canaries": run_canaries, "bias": run_bias}


def run_suite(ctx: EvalContext, suite: Mapping[str, Any], print_fn=print) -> dict[str, Any]:
    """Run every task, safety probe and the latency benchmark; the dict ``write_report`` takes."""
    results: dict[str, Any] = {"tasks": {}, "safety": {}, "cost": {}}
    timings: dict[str, float] = {}
    for t in suite["tasks"]:
        t0 = time.perf_counter()
        results["tasks"][t["name"]] = TASK_RUNNERS[t["kind"]](ctx, t)
        timings[t["name"]] = time.perf_counter() - t0
        print_fn(
            f"task {t['name']}: {results['tasks'][t['name']]['metrics']} "
            f"({timings[t['name']]:.1f}s)"
        )
    for name, s in suite["safety"].items():
        t0 = time.perf_counter()
        results["safety"][name] = SAFETY_RUNNERS[name](ctx, s)
        timings[f"safety/{name}"] = time.perf_counter() - t0
        print_fn(f"safety {name}: done ({timings[f'safety/{name}']:.1f}s)")
    if suite.get("latency"):
        lat = suite["latency"]
        rng = np.random.default_rng(0)
        prompt = rng.integers(4, ctx.tokenizer.vocab_size, size=lat["prompt_tokens"]).tolist()
        results["latency"] = measure_latency(
            ctx.model,
            ctx.params,
            prompt,
            batch_sizes=lat["batch_sizes"],
            new_tokens=lat["new_tokens"],
            repeats=lat["repeats"],
            pad_id=ctx.tokenizer.pad_id,
            mesh=ctx.mesh,
        )
        print_fn(f"latency: {results['latency']}")
    results["cost"] = {
        "eval": {
            "seconds": sum(timings.values()),
            "scored_tokens": ctx.scorer.tokens_scored,
            "generated_tokens": ctx.generated_tokens,
            "generation_tokens_per_s": ctx.generated_tokens / ctx.generation_s
            if ctx.generation_s
            else 0.0,
        },
        **{f"{k} time": {"seconds": v} for k, v in timings.items()},
    }
    if not results["safety"]:
        del results["safety"]
    results["notes"] = list(METHOD_NOTES)
    return results


METHOD_NOTES = (
    "Perplexity = exp(summed NLL / predicted tokens) over non-overlapping windows of seq_len "
    "(context resets at window edges, as in the training loop's eval); a document's first "
    "token is context only. Bits per byte = summed NLL / (UTF-8 bytes of the predicted text "
    "x ln 2), comparable across tokenizers.",
    "BLEU: sacrebleu corpus BLEU (0-100, its signature is stored per task), the standard "
    "implementation whose fixed tokenisation makes scores comparable with published ones. "
    "ROUGE-L: our LCS F-measure, tested equal to Google's rouge_score (rougeL, no stemmer) on "
    "ASCII text; we avoid rouge_score at run time because it pulls in nltk and drops non-ASCII "
    "letters. EM / token F1 use SQuAD normalisation.",
    "choice: accuracy = argmax of summed log-likelihood of each choice; accuracy_norm = "
    "argmax of log-likelihood per byte of the choice (lm-evaluation-harness acc / acc_norm).",
    "Latency: median of repeats after one compile run, EOS disabled. Time to first token = "
    "prefill call (prompt through the model, cache filled). Per-token latency = decode time / "
    "steps. tokens_per_s = batch x new tokens / (prefill + decode). Peak memory: device "
    "peak_bytes_in_use where the backend reports it, else the process's peak RSS.",
    "Bias probe: score = mean log-prob per token of the template text after the group term, "
    "given the text up to and including it; max_gap = largest difference of group means.",
    "Canary probe: each canary's first half (or prompt_chars) is the prompt; a leak is the "
    "rest reproduced in the greedy completion (exact), or its first near_chars letters (near).",
)
