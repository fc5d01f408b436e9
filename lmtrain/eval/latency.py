"""Generation cost: throughput, time to first token and per-token latency per batch size; memory.

Each batch size is run once to compile, then ``repeats`` times; we report medians. EOS is
disabled so every run decodes exactly ``new_tokens`` tokens and runs are comparable.
Time to first token = the prefill call (prompt through the model, cache filled, logits of the
first new token ready). Per-token latency = decode time / decode steps (one sample + one forward
per step). Peak memory is the accelerator's ``peak_bytes_in_use`` when the backend reports it
(GPU/TPU), else the process's peak resident set size (CPU), and the report says which.
"""

from __future__ import annotations

import resource
import statistics
import sys
from collections.abc import Sequence

import jax

from lmtrain.errors import ConfigError
from lmtrain.infer.sampling import SamplingParams, generate


def peak_memory() -> dict[str, float | str]:
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {
            "peak_memory_mb": stats["peak_bytes_in_use"] / 2**20,
            "peak_memory_kind": "device peak_bytes_in_use",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    return {"peak_memory_mb": rss_bytes / 2**20, "peak_memory_kind": "process peak RSS (host)"}


def measure_latency(
    model,
    params,
    prompt: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 64,
    repeats: int = 3,
    pad_id: int = 0,
    mesh=None,
) -> dict[str, dict[str, float | str]]:
    """``{"batch_1": {...}, "batch_8": {...}}`` with tokens/s, TTFT and per-token latency (ms)."""
    if not prompt or new_tokens < 1 or repeats < 1 or not batch_sizes:
        raise ConfigError(
            "latency needs a non-empty prompt, new_tokens >= 1, repeats >= 1 and batch sizes; "
            f"got {len(prompt)} prompt tokens, new_tokens={new_tokens}, repeats={repeats}"
        )
    out: dict[str, dict[str, float | str]] = {}
    for b in batch_sizes:
        prompts = [list(prompt)] * int(b)
        sp = SamplingParams(max_new_tokens=new_tokens, eos_id=-1)
        generate(model, params, prompts, sp, pad_id=pad_id, mesh=mesh)  # compile
        runs = [generate(model, params, prompts, sp, pad_id=pad_id, mesh=mesh).timing
                for _ in range(repeats)]  # fmt: skip
        prefill = statistics.median(r["prefill_s"] for r in runs)
        decode = statistics.median(r["decode_s"] for r in runs)
        steps = runs[0]["steps"]
        out[f"batch_{b}"] = {
            "batch_size": int(b),
            "prompt_tokens": len(prompt),
            "new_tokens": int(steps),
            "time_to_first_token_ms": 1e3 * prefill,
            "per_token_latency_ms": 1e3 * decode / steps,
            "tokens_per_s": b * steps / (prefill + decode),
            "decode_tokens_per_s": b * steps / decode,
        }
    mem = peak_memory()
    for row in out.values():
        row.update(mem)
    return out
