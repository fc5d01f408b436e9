"""What a compiled program's HLO text says about communication: collectives by kind.

Async pairs (``all-gather-start`` / ``-done``) count once, at their start; the bytes are those of
the op's result (the gathered array, the reduced array, the permuted buffer). TPU fuses some
reductions into ``all-reduce-scatter`` fusions, counted as reduce-scatter.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
# "%name = <shape> <op>(" where <shape> is an array or a tuple of arrays
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            out.append(n * _BYTES[dtype])
    return out


def _kind(op: str, name: str) -> str | None:
    if op == "fusion":  # TPU's fused reduce-scatter
        return "reduce-scatter" if "reduce-scatter" in name else None
    base = op.removesuffix("-start")
    if base != op or op in KINDS:
        return base if base in KINDS else None
    return None


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": b}}`` over every computation of the module."""
    out = {k: {"count": 0, "bytes": 0} for k in KINDS}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        kind = _kind(op, name)
        if kind is None:
            continue
        sizes = _array_bytes(shape)
        if not sizes:
            continue
        # async starts return (operand(s), result, context...): the result is the largest array
        # for gathers, equal to the operand for the others
        out[kind]["count"] += 1
        out[kind]["bytes"] += max(sizes)
    return out


def batch_dims(hlo_text: str, global_batch: int, shard_batch: int) -> dict[str, int]:
    """How many array shapes in the module lead with the global batch vs the per-shard batch.

    Under data parallelism every activation should carry the per-shard batch; a leading global
    batch means some chip computes (or holds) activations for all sequences.
    """
    lead = re.compile(r"\b[a-z]+\d*\[(\d+),")
    counts = {"global": 0, "shard": 0}
    for m in lead.finditer(hlo_text):
        d = int(m.group(1))
        if d == global_batch:
            counts["global"] += 1
        elif d == shard_batch:
            counts["shard"] += 1
    return counts
