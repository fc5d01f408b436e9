"""An lm-evaluation-harness model backend for lmtrain runs (``pip install 'lmtrain[eval]'``).

Importing this module registers the model name ``lmtrain`` with lm-eval, so all three work::

    import lmtrain.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="lmtrain", model_args="workdir=runs/quickstart", tasks=[...])
    lmtrain eval --harness --tasks lmtrain_mc,lmtrain_ppl --checkpoint runs/quickstart --out ev/
    python -m lmtrain.eval.harness run --model lmtrain --model_args workdir=runs/q --tasks ...

The three request types follow lm-eval's own Hugging Face backend (``lm_eval.models.
huggingface.HFLM``) step for step, so scores are comparable with published ones:

- ``loglikelihood``: requests sorted longest first and batched; each row is ``context +
  continuation`` left-truncated to ``max_length + 1`` tokens (the oldest context goes first),
  right-padded (causal attention never looks right, so padding cannot change a score); the
  continuation's log-probs are summed and ``is_greedy`` is whether argmax reproduces it.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens with
  the prefix token (BOS) in front, scored as above and summed per document.
- ``generate_until``: requests grouped by generation settings, sorted longest first, contexts
  left-truncated to ``max_length - max_gen_toks`` and left-padded by the KV-cache sampler
  (``lmtrain.infer.sampling``); stop strings end a row inside the decode loop (as token ids)
  and are cut on the decoded text, as lm-eval does.

The forward pass runs on the run's mesh with the training shardings (batch over data/fsdp).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from lmtrain.errors import ConfigError, DataError
from lmtrain.infer.loader import load_run
from lmtrain.infer.sampling import SamplingParams, generate, stop_token_ids
from lmtrain.model.sharding import LOGICAL_RULES, batch_sharding, data_shards

MODEL_NAME = "lmtrain"
RESULTS_FILE = "harness_results.json"


def _token_logprobs_fn(model):
    def fn(params, inputs_BT, targets_BT):
        logits = model.apply({"params": params}, inputs_BT).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok_logp = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
        return tok_logp, jnp.argmax(logits, axis=-1) == targets_BT

    return fn


def _as_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


@register_model(MODEL_NAME)
class LmtrainLM(TemplateLM):
    """lm-eval ``LM`` over a trained (or imported) lmtrain workdir.

    ``model_args``: ``workdir`` (required unless ``run`` is given), ``step`` (latest, best or N),
    ``batch_size`` (rows per forward/generation batch, rounded up to the data shards),
    ``max_length`` (default: the model's ``max_seq_len``), ``max_gen_toks`` (default 256, as
    HFLM), ``add_bos_token`` (default: the tokenizer's own setting), ``prefix_token_id``
    (default BOS, else EOS), ``length_multiple`` (padded lengths are rounded up to it so a
    few compiled shapes serve every batch). ``run`` (Python API only) is an already loaded
    ``lmtrain.infer.loader.LoadedRun``.
    """

    def __init__(
        self,
        workdir: str | None = None,
        step: str | int | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | str | None = None,
        length_multiple: int | str = 16,
        run=None,
        **unused: Any,
    ):
        super().__init__()
        if run is None:
            if not workdir:
                raise ConfigError(
                    "the lmtrain lm-eval backend needs model_args workdir=<lmtrain run directory>"
                )
            run = load_run(workdir, step)
        self.run = run
        setup = run.setup
        self.lm_model, self.params, self.tok, self.mesh = (
            setup.model,
            run.params,
            setup.tokenizer,
            setup.mesh,
        )
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8  # no memory probing: a fixed batch keeps the compiled shapes fixed
        shards = data_shards(self.mesh) if self.mesh is not None else 1
        self._batch_size = -(-int(batch_size) // shards) * shards
        self._max_length = int(max_length or self.lm_model.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        bos = _as_bool(add_bos_token)
        self.add_bos_token = bool(getattr(self.tok, "add_bos", False)) if bos is None else bos
        self._prefix = None if prefix_token_id is None else int(prefix_token_id)
        self.length_multiple = max(1, int(length_multiple))
        self._logprobs = jax.jit(_token_logprobs_fn(self.lm_model))

    # ------------------------------------------------------------------- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        return int(self.tok.bos_id) if self.tok.bos_id >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"lmtrain-{self.tok.fingerprint()[:16]}"

    def get_model_info(self) -> dict[str, Any]:
        return {
            "lmtrain_checkpoint_dir": self.run.checkpoint_dir,
            "lmtrain_step": self.run.step,
            "model_num_parameters": int(self.run.setup.model_cfg.param_count()),
        }

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tok.encode(string, bos=bool(bos))
        if bos and len(ids) > 1 and ids[1] == ids[0] == self.tok.bos_id:
            ids = ids[1:]  # the text already began with BOS (HFLM's has_bos_prefix)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens))

    # ------------------------------------------------------------------------- the forward

    def _place(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def _forward(self, inputs: np.ndarray, targets: np.ndarray):
        if self.mesh is None:
            out = self._logprobs(self.params, inputs, targets)
        else:
            with self.mesh, nn.logical_axis_rules(LOGICAL_RULES):
                out = self._logprobs(self.params, self._place(inputs), self._place(targets))
        return tuple(np.asarray(x) for x in out)

    def _padded_len(self, n: int) -> int:
        return min(-(-n // self.length_multiple) * self.length_multiple, max(self.max_length, n))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=longest_first)
        res: list[tuple[float, bool]] = []
        L, B = self.max_length, self.batch_size
        for chunk in re_ord.get_batched(n=B):
            rows = []
            for _, context, continuation in chunk:
                if not context or not continuation:
                    raise DataError(
                        "loglikelihood request with an empty context or continuation after "
                        "tokenization; check the task's doc_to_text/doc_to_choice"
                    )
                if len(continuation) > L:
                    raise DataError(
                        f"continuation of {len(continuation)} tokens exceeds the model's "
                        f"max_length {L}; shorten it or raise max_length"
                    )
                # Too long for the model: drop the oldest context tokens (HFLM does the same).
                whole = (context + continuation)[-(L + 1) :]
                rows.append((whole[:-1], whole[1:], len(continuation)))
            T = self._padded_len(max(len(r[0]) for r in rows))
            inputs = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            for i, (inp, tgt, _) in enumerate(rows):
                inputs[i, : len(inp)] = inp
                targets[i, : len(tgt)] = tgt
            tok_logp, greedy = self._forward(inputs, targets)
            for i, ((request_str, _, _), (inp, _, n)) in enumerate(zip(chunk, rows)):
                scored = slice(len(inp) - n, len(inp))
                answer = (float(tok_logp[i, scored].sum()), bool(greedy[i, scored].all()))
                res.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(req.args), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:

        def longest_first(req):
            return -len(self.tok_encode(req[0])), req[0]

        re_ords = Collator(
            [req.args for req in requests],
            sort_fn=longest_first,
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        res: list[str] = []
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks))
            # EOS ends a row as a token inside the sampler; its text never appears decoded.
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_gen = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if room <= 0:
                raise ConfigError(
                    f"max_gen_toks={max_gen} leaves no room for a prompt in max_length="
                    f"{self.max_length}; lower max_gen_toks in the task or model_args"
                )
            ids = [self.tok_encode(c, left_truncate_len=room) or [self.prefix_token_id]
                   for c in contexts]  # fmt: skip
            longest = max(len(i) for i in ids)
            multiple = self.length_multiple if self._padded_len(longest) <= room else 1
            sp = SamplingParams(
                max_new_tokens=max_gen,
                eos_id=self.eot_token_id,
                temperature=float(kwargs.get("temperature", 0.0))
                if kwargs.get("do_sample")
                else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
                stop_sequences=stop_token_ids(self.tok, until),
            )
            g = generate(
                self.lm_model,
                self.params,
                ids,
                sp,
                seed=int(kwargs.get("seed") or 0),
                pad_id=self.tok.pad_id,
                mesh=self.mesh,
                batch_multiple=self.batch_size,
                prompt_len_multiple=multiple,
            )
            for context, gen_kwargs, toks in zip(contexts, all_kwargs, g.tokens):
                text = postprocess_generated_text(self.tok_decode(toks), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return re_ords.get_original(res)


# ------------------------------------------------------------------------------- running


def task_manager(include_path: str | Sequence[str] | None = None):
    """lm-eval's TaskManager; with ``include_path``, only those task folders (fast, offline)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        return TaskManager(include_path=include_path, include_defaults=False)
    return TaskManager()


def run_harness(
    lm: LmtrainLM,
    tasks: Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``lm``; lm-eval's results dict (JSON-safe)."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager(include_path),
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    if out is None:
        raise ConfigError("lm-eval returned no results (is this process rank 0?)")
    return json.loads(json.dumps(out, default=lm_utils.handle_non_serializable))


def harness_summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value, "n": docs}}`` from lm-eval's results (filters kept in names)."""
    summary: dict[str, dict[str, Any]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key:
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric} ({filt})"] = value
        n = results.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = n.get("effective", n.get("original"))
        summary[task] = row
    return summary


def write_results(out_dir: str, results: dict[str, Any]) -> str:
    """lm-eval's results JSON (as its CLI writes it, samples aside) → ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS_FILE)
    body = {k: v for k, v in results.items() if k != "samples"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, default=lm_utils.handle_non_serializable)
    return path


def main() -> None:
    """``python -m lmtrain.eval.harness [lm-eval arguments]``: lm-eval's own command line with
    the ``lmtrain`` model registered, e.g. ``python -m lmtrain.eval.harness run --model lmtrain
    --model_args workdir=runs/q --tasks lmtrain_mc --include_path tests/support/harness_tasks``. (lm-eval
    finds models only among those imported; it has no plugin entry points to register with.)"""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
