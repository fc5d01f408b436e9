"""What a compiled program's HLO text says about communication: collectives by kind.

Async pairs (``all-gather-start`` / ``-done``) count once, at their start; the bytes are those of
the op's result (the gathered array, the reduced array, the permuted buffer). TPU emits FSDP's
gradient reduce-scatter as a fusion that calls an ``all-reduce-scatter`` computation: it counts
once, as reduce-scatter, and the all-reduce inside that computation is not counted again. Over
large meshes it implements all-gathers as all-reduces of zero-padded shards (operands made by
dynamic-update-slice): those count as all-gather.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# the opcode: the first "word(" after whitespace (shapes never put "(" right after a word
# that follows a space; layouts like T(8,128) follow a colon)
_OP = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLS_RS = re.compile(r"calls=%?(all-reduce-scatter[\w.\-]*)")


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            out.append(n * _BYTES[dtype])
    return out


def _result_bytes(op: str, shape: str) -> int:
    sizes = _array_bytes(shape)
    if not op.endswith("-start"):
        return sum(sizes)  # a combined collective returns a tuple of its results
    # async starts return (operands, results, contexts): drop the u32[] contexts, keep results
    sizes = [b for b in sizes if b > 4] or sizes
    if op == "all-reduce-start" or len(sizes) == 1:
        return sum(sizes)
    return sum(sizes[len(sizes) // 2 :])


def _gathers(args: str) -> bool:
    """An all-reduce whose operands all come from dynamic-update-slices: each chip writes its
    shard into zeros and the sum is the gathered array (how TPU's compiler implements some
    all-gathers over large meshes)."""
    operands = re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])
    return bool(operands) and all("dynamic-update-slice" in o for o in operands)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": b}}`` over every computation of the module."""
    out = {k: {"count": 0, "bytes": 0} for k in KINDS}
    inside_rs = False  # in the body of a fused reduce-scatter: counted at its call
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header, or its closing brace
            name = line.split()[0].lstrip("%") if line.split() else ""
            if name == "ENTRY":
                name = line.split()[1].lstrip("%")
            inside_rs = name.startswith("all-reduce-scatter")
            continue
        if inside_rs:
            continue
        m = _DEF.match(line)
        if not m:
            continue
        rest = " " + m.group(2)
        op_match = _OP.search(rest)
        if not op_match:
            continue
        op, shape = op_match.group(1), rest[: op_match.start()]
        if op == "fusion" and _CALLS_RS.search(rest):
            kind = "reduce-scatter"
        elif op in ("all-reduce", "all-reduce-start") and _gathers(rest[op_match.end() :]):
            kind = "all-gather"
        else:
            base = op.removesuffix("-start")
            kind = base if base in KINDS and not op.endswith("-done") else None
        if kind is None:
            continue
        out[kind]["count"] += 1
        out[kind]["bytes"] += _result_bytes(op, shape)
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
