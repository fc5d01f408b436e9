"""Token shards: each split is one concatenated token stream stored in ArrayRecord files.

Format (one directory per split, e.g. ``<out>/train/``):

* ``shard-00000.array_record`` ...: every record is a fixed-size chunk (``chunk_tokens``) of the
  split's token stream, little-endian ``uint16`` (vocab <= 65536) or ``uint32``. The stream is the
  split's documents in order, each followed by the EOS id, so document boundaries survive without
  side tables: the input pipeline derives segment ids and positions from EOS.
* ``index.json``: dtype, chunk size, EOS id and, per shard, its file name, token count, record
  count and sha256.

Fixed-size chunks make any window of the stream two record reads away, so the pipeline can shuffle
windows globally (nanoGPT-style random crops) with O(1) state: Grain's record index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmtrain.errors import DataError

INDEX_FILE = "index.json"
DEFAULT_CHUNK_TOKENS = 4096
DEFAULT_SHARD_TOKENS = 16 * 1024 * 1024


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends documents (token id lists) to a split directory; ``close()`` writes the index."""

    def __init__(
        self,
        split_dir: str | os.PathLike,
        *,
        vocab_size: int,
        eos_id: int,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
    ):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.eos_id = int(eos_id)
        self.chunk_tokens = int(chunk_tokens)
        self.records_per_shard = max(1, shard_tokens // chunk_tokens)
        self._buf = np.empty(0, dtype=self.dtype)
        self._shards: list[dict] = []
        self._writer = None
        self._records_in_shard = 0
        self._tokens_in_shard = 0
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        doc = np.asarray(ids, dtype=np.int64)
        if doc.size and (doc.min() < 0 or doc.max() >= np.iinfo(self.dtype).max + 1):
            raise DataError(f"token id out of range for {self.dtype} shards")
        doc = np.concatenate([doc, [self.eos_id]]).astype(self.dtype)
        self._buf = np.concatenate([self._buf, doc])
        self.num_documents += 1
        self.num_tokens += doc.size
        while self._buf.size >= self.chunk_tokens:
            self._write_record(self._buf[: self.chunk_tokens])
            self._buf = self._buf[self.chunk_tokens :]

    def add_many(self, docs: Sequence[Sequence[int] | np.ndarray]) -> None:
        """``add`` of each document in turn, with one concatenation for all of them."""
        if not len(docs):
            return
        eos = np.array([self.eos_id], dtype=np.int64)
        cat = np.concatenate([x for d in docs for x in (np.asarray(d, dtype=np.int64), eos)])
        if cat.min() < 0 or cat.max() >= np.iinfo(self.dtype).max + 1:
            raise DataError(f"token id out of range for {self.dtype} shards")
        self._buf = np.concatenate([self._buf, cat.astype(self.dtype)])
        self.num_documents += len(docs)
        self.num_tokens += cat.size
        while self._buf.size >= self.chunk_tokens:
            self._write_record(self._buf[: self.chunk_tokens])
            self._buf = self._buf[self.chunk_tokens :]

    def _write_record(self, chunk: np.ndarray) -> None:
        if self._writer is None:
            name = f"shard-{len(self._shards):05d}.array_record"
            self._writer = self._writer_cls(str(self.dir / name), "group_size:1")
            self._shards.append({"file": name})
            self._records_in_shard = 0
            self._tokens_in_shard = 0
        self._writer.write(np.ascontiguousarray(chunk).tobytes())
        self._records_in_shard += 1
        self._tokens_in_shard += chunk.size
        if self._records_in_shard >= self.records_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        info = self._shards[-1]
        info["num_records"] = self._records_in_shard
        info["num_tokens"] = self._tokens_in_shard
        info["sha256"] = sha256_file(self.dir / info["file"])

    def close(self) -> dict:
        if self._buf.size:
            self._write_record(self._buf)
            self._buf = self._buf[:0]
        if self._writer is not None:
            self._close_shard()
        index = {
            "format": "lmtrain-token-stream-v1",
            "dtype": self.dtype.str,
            "chunk_tokens": self.chunk_tokens,
            "eos_id": self.eos_id,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "shards": self._shards,
        }
        with open(self.dir / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return index


def write_split(
    split_dir: str | os.PathLike,
    documents: Iterable[Sequence[int]],
    *,
    vocab_size: int,
    eos_id: int,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict:
    writer = ShardWriter(split_dir, vocab_size=vocab_size, eos_id=eos_id, chunk_tokens=chunk_tokens)
    for doc in documents:
        writer.add(doc)
    return writer.close()


def read_index(split_dir: str | os.PathLike) -> dict:
    path = Path(split_dir) / INDEX_FILE
    if not path.exists():
        raise DataError(
            f"no token shards at {split_dir}: {INDEX_FILE} is missing. "
            "Run `lmtrain data prepare` to create them, or fix config.data.dir."
        )
    with open(path) as f:
        return json.load(f)


class TokenStream:
    """Random access to a split's token stream: ``stream.read(start, length)``."""

    def __init__(self, split_dir: str | os.PathLike, cache_bytes: int = 64 << 20):
        import grain

        self.dir = Path(split_dir)
        self.index = read_index(split_dir)
        self.dtype = np.dtype(self.index["dtype"])
        self.chunk_tokens = int(self.index["chunk_tokens"])
        self.eos_id = int(self.index["eos_id"])
        self.num_tokens = int(self.index["num_tokens"])
        paths = [str(self.dir / s["file"]) for s in self.index["shards"]]
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"shard {p} listed in {self.dir / INDEX_FILE} is missing")
        self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []
        # Decoded records, least recently used first. Training reads random windows, so a small
        # cache misses on almost every read and each miss is an array_record read; 64 MiB holds a
        # small split whole and bounds a large one's memory.
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_records = max(1, cache_bytes // (self.chunk_tokens * self.dtype.itemsize))

    def __len__(self) -> int:
        return self.num_tokens

    def _record(self, i: int) -> np.ndarray:
        rec = self._cache.get(i)
        if rec is None:
            rec = np.frombuffer(self._source[i], dtype=self.dtype)
            self._cache[i] = rec
            if len(self._cache) > self._cache_records:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return rec

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"range [{start}, {start + length}) outside stream of {self.num_tokens}"
            )
        out = np.empty(length, dtype=np.int32)
        pos, filled = start, 0
        while filled < length:
            r, off = divmod(pos, self.chunk_tokens)
            rec = self._record(r)
            take = min(length - filled, rec.size - off)
            out[filled : filled + take] = rec[off : off + take]
            filled += take
            pos += take
        return out

    def __getstate__(self):  # Grain may pickle sources into worker processes.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state
