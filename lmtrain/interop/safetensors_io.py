"""Safetensors read/write, one tensor at a time (no framework needed, bfloat16 included).

Reading memory-maps each file and returns views, so importing a model larger than free RAM
only pages in the tensor being converted. Writing takes tensor *specs* (name, shape, dtype,
producer) so each shard's header is written first and each tensor is produced, written and
dropped in turn. The format: 8-byte little-endian header length, a JSON header mapping names to
``{dtype, shape, data_offsets}`` (relative to the end of the header), then the raw bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from lmtrain.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is not plausible")
        header = json.loads(f.read(n))
    return header, 8 + n


class SafetensorsReader:
    """All tensors of a model directory (``model.safetensors``, a sharded index, ``*.safetensors``) or one file."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(model_dir):  # one file given directly
            self.model_dir, files = os.path.split(os.path.abspath(model_dir))
            files = [files]
        elif os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not files:
            raise CheckpointError(
                f"no safetensors weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
                "(PyTorch .bin checkpoints: re-save them with save_pretrained(safe_serialization=True))"
            )
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(self.model_dir, name)
            if not os.path.exists(path):
                raise CheckpointError(
                    f"{INDEX_FILE} names {name}, which is missing from {model_dir}"
                )
            header, base = _read_header(path)
            for key, info in header.items():
                if key != "__metadata__":
                    self._entries[key] = (path, info, base)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor."""
        if name not in self._entries:
            raise CheckpointError(f"tensor {name!r} not found in {self.model_dir}")
        path, info, base = self._entries[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{name}: safetensors dtype {info['dtype']} is not supported")
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{name} in {path}: byte range does not match shape {shape}")
        if not shape or end == start:
            with open(path, "rb") as f:
                f.seek(base + start)
                return np.frombuffer(f.read(end - start), dtype).reshape(shape)
        return np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _write_file(path: str, specs: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt not in _NAMES:
            raise CheckpointError(f"{s.name}: dtype {dt} cannot be written to safetensors")
        header[s.name] = {
            "dtype": _NAMES[dt],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            arr = np.ascontiguousarray(np.asarray(s.produce(), dtype=s.dtype))
            if arr.shape != tuple(s.shape):
                raise CheckpointError(
                    f"{s.name}: produced shape {arr.shape}, header says {s.shape}"
                )
            f.write(arr.tobytes())


def _shards(specs: Sequence[TensorSpec], max_bytes: int) -> Iterator[list[TensorSpec]]:
    cur: list[TensorSpec] = []
    size = 0
    for s in specs:
        if cur and size + s.nbytes > max_bytes:
            yield cur
            cur, size = [], 0
        cur.append(s)
        size += s.nbytes
    if cur:
        yield cur


def write_safetensors(
    out_dir: str,
    specs: Sequence[TensorSpec],
    *,
    max_shard_bytes: int = 5 * 2**30,
    filename: str = SINGLE_FILE,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Writes one file, or Hugging Face-style shards plus an index when over ``max_shard_bytes``."""
    os.makedirs(out_dir, exist_ok=True)
    metadata = dict(metadata or {"format": "pt"})
    groups = list(_shards(specs, max_shard_bytes))
    if len(groups) <= 1:
        _write_file(os.path.join(out_dir, filename), groups[0] if groups else [], metadata)
        return [filename]
    stem = filename.removesuffix(".safetensors")
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_file(os.path.join(out_dir, name), group, metadata)
        names.append(name)
        weight_map.update({s.name: name for s in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return names
