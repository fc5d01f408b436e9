"""Evaluation over the eval split (or a fine-tuning eval file) and the end-of-run samples."""

from __future__ import annotations

import os

import jax
import numpy as np

from lmtrain.data import finetune_data, pipeline
from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.train.setup import Setup, to_global


def eval_rows_per_process(cfg) -> int:
    """This process's rows of an eval batch (``train.eval_batch_size``, default the train batch)."""
    return (cfg.train.eval_batch_size or cfg.train.global_batch_size) // jax.process_count()


def _sum_results(outs: list[dict]) -> dict[str, float]:
    """Per-batch eval sums → totals, in float64 on the host (one device-to-host transfer)."""
    sums: dict[str, float] = {}
    for out in jax.device_get(outs):
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return sums


def evaluate(setup: Setup, eval_step, params, max_batches: int = 0, frozen=None) -> dict:
    cfg = setup.config
    if setup.eval_rows is not None:
        return evaluate_rows(setup, eval_step, params, max_batches, frozen)
    split_dir = os.path.join(setup.data_dir, cfg.data.eval_split)
    per_process = eval_rows_per_process(cfg)
    outs = []  # device results, fetched once at the end: dispatch never waits for the host
    for batch in pipeline.eval_batches(
        split_dir,
        seq_len=cfg.data.seq_len,
        batch_size=per_process,
        max_batches=max_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        outs.append(eval_step(params, to_global(batch, setup.batch_sharding)))
    sums = _sum_results(outs)
    weight = max(sums.get("weight", 0.0), 1.0)
    result = {
        "eval/loss": sums.get("loss_sum", 0.0) / weight,
        "eval/tokens": sums.get("weight", 0.0),
    }
    if "nll_sum" in sums:
        result["eval/perplexity"] = float(np.exp(sums["nll_sum"] / weight))
    return result


def evaluate_rows(setup: Setup, eval_step, params, max_batches: int = 0, frozen=None) -> dict:
    """Eval over a fine-tuning eval file: loss and every metric averaged over its full weight."""
    cfg = setup.config
    outs = []
    for batch in finetune_data.eval_batches(
        setup.eval_rows,
        batch_size=eval_rows_per_process(cfg),
        max_batches=max_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        outs.append(eval_step(params, to_global(batch, setup.batch_sharding), frozen))
    sums = _sum_results(outs)
    weight = max(sums.pop("weight", 0.0), 1.0)
    result = {"eval/loss": sums.pop("loss_sum", 0.0) / weight, "eval/weight": weight}
    result.update({f"eval/{k.removesuffix('_sum')}": v / weight for k, v in sums.items()})
    if "eval/nll" in result:
        result["eval/perplexity"] = float(np.exp(result["eval/nll"]))
    return result


def sample_texts(
    setup: Setup,
    params,
    n: int,
    max_new: int,
    prompt: str | None = None,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    compile_only: bool = False,
):
    """``n`` samples of ``max_new`` tokens; ``compile_only``: compile them (abstract params ok)."""
    tok = setup.tokenizer
    prompt = prompt if prompt is not None else setup.config.train.sample_prompt
    if prompt:
        ids = tok.encode(prompt)
    else:
        stream_ids = pipeline.TokenStream(
            os.path.join(setup.data_dir, setup.config.data.eval_split)
        ).read(0, 16)
        ids = [int(i) for i in stream_ids]
    if not compile_only:
        params = jax.device_get(params)
    sp = SamplingParams(max_new, tok.eos_id, temperature, top_k, past_context=True)
    g = generate(
        setup.model, params, [ids] * n, sp, seed=seed, pad_id=tok.pad_id, compile_only=compile_only
    )
    return [] if compile_only else [tok.decode(ids + o) for o in g.tokens]
