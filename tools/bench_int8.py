"""Int8 weight-only quantization vs bfloat16: weight memory and logit error on held-out text.

Loads a workdir's latest checkpoint, runs the model three ways on validation tokens (float32
weights and compute as the reference, bfloat16 weights and compute, int8 weights with per-channel
scales dequantized to bfloat16) and prints weight bytes, the int8/bf16 memory ratio, max and mean
absolute logit error, next-token loss and top-1 agreement. One JSON line at the end.

    python tools/bench_int8.py --workdir /tmp/shakes6 --batch 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.data.pipeline import TokenStream
from lmtrain.model.transformer import Transformer
from lmtrain.quant.int8 import dequantize_params, quantize_params, tree_nbytes
from lmtrain.train.run_loader import load_workdir, tokenizer_dir


def held_out_tokens(workdir: str, cfg, batch: int, seq_len: int) -> np.ndarray:
    data_dir = os.path.dirname(tokenizer_dir(workdir, cfg))
    stream = TokenStream(os.path.join(data_dir, cfg.data.eval_split))
    ids = np.asarray(stream.read(0, batch * (seq_len + 1)), np.int32)
    return ids.reshape(batch, seq_len + 1)


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    return float(-jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1).mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args(argv)

    lm = load_workdir(args.workdir)
    seq_len = min(args.seq_len, lm.model_cfg.max_seq_len)
    tokens = held_out_tokens(args.workdir, lm.config, args.batch, seq_len)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    f32 = Transformer(dataclasses.replace(lm.model_cfg, dtype="float32", param_dtype="float32"))
    bf16 = Transformer(dataclasses.replace(lm.model_cfg, dtype="bfloat16", param_dtype="bfloat16"))

    params_f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), lm.params)
    params_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), lm.params)
    qparams = quantize_params(params_f32)

    ref = np.asarray(jax.jit(f32.apply)({"params": params_f32}, inputs))
    out_bf16 = np.asarray(jax.jit(bf16.apply)({"params": params_bf16}, inputs))
    int8_apply = jax.jit(lambda q, x: bf16.apply({"params": dequantize_params(q, jnp.bfloat16)}, x))
    out_int8 = np.asarray(int8_apply(qparams, inputs))

    bytes_bf16, bytes_int8 = tree_nbytes(params_bf16), tree_nbytes(qparams)
    result = {
        "workdir": args.workdir,
        "step": lm.step,
        "params": lm.model_cfg.param_count(),
        "tokens": int(inputs.size),
        "weight_bytes_f32": tree_nbytes(params_f32),
        "weight_bytes_bf16": bytes_bf16,
        "weight_bytes_int8": bytes_int8,
        "memory_ratio_int8_vs_bf16": bytes_int8 / bytes_bf16,
        "max_abs_logit_err_int8_vs_bf16": float(np.abs(out_int8 - out_bf16).max()),
        "mean_abs_logit_err_int8_vs_bf16": float(np.abs(out_int8 - out_bf16).mean()),
        "max_abs_logit_err_int8_vs_f32": float(np.abs(out_int8 - ref).max()),
        "max_abs_logit_err_bf16_vs_f32": float(np.abs(out_bf16 - ref).max()),
        "logit_range_f32": float(np.abs(ref).max()),
        "loss_f32": nll(ref, targets),
        "loss_bf16": nll(out_bf16, targets),
        "loss_int8": nll(out_int8, targets),
        "top1_agreement_int8_vs_bf16": float((out_int8.argmax(-1) == out_bf16.argmax(-1)).mean()),
    }
    print(
        f"weights: f32 {result['weight_bytes_f32']:,} B | bf16 {bytes_bf16:,} B | int8 {bytes_int8:,} B "
        f"(ratio int8/bf16 {result['memory_ratio_int8_vs_bf16']:.3f})"
    )
    print(
        f"max |logit err| int8 vs bf16 {result['max_abs_logit_err_int8_vs_bf16']:.4f} "
        f"(mean {result['mean_abs_logit_err_int8_vs_bf16']:.4f}); bf16 vs f32 "
        f"{result['max_abs_logit_err_bf16_vs_f32']:.4f}; logits span ±{result['logit_range_f32']:.2f}"
    )
    print(
        f"loss f32 {result['loss_f32']:.4f} | bf16 {result['loss_bf16']:.4f} | int8 {result['loss_int8']:.4f} "
        f"| top-1 agreement int8/bf16 {100 * result['top1_agreement_int8_vs_bf16']:.2f}%"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
