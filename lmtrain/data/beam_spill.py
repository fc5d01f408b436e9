"""Temporary text, signature and token files of the Beam runner, so shuffles carry small records.

The Beam runner's shuffles and materialised collections hold per-document records of a few
hundred bytes (corpus position, id, content hash, LSH band keys, a reference into these files);
the documents' cleaned text, MinHash signatures and token ids go to files under
``<out>/_beam/`` through the filesystem layer (so ``gs://`` outputs work on Dataflow) and are read
back by reference where a step needs them (verifying a candidate pair, the tokenizer sample,
encoding, writing a shard). The driver removes ``_beam/`` when the pipeline has finished.

* Per input file (one read unit): ``spill/SSSSS-FFFFFFF.txt`` (cleaned texts, UTF-8, back to
  back) and ``.sig`` (one ``num_perm`` x uint32 row per kept document). Their names depend only
  on the unit, and their content only on the input and config, so a retried bundle rewrites the
  same bytes.
* Per encode batch: ``tokens/<random>.bin`` (token ids with the end-of-document id); a retried
  batch writes a new file and the records that reach the next step name the one that finished.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict

from lmtrain.data import fs
from lmtrain.errors import DataError

SPILL_DIR = "_beam"
_SOURCE_BITS, _FILE_BITS, _DOC_BITS = 15, 20, 28


def pack_order(source: int, file: int, doc: int) -> int:
    """One int that sorts like ``(source, file, document)``: a document's corpus position."""
    if source >> _SOURCE_BITS or file >> _FILE_BITS or doc >> _DOC_BITS:
        raise DataError(
            f"--runner beam handles at most {1 << _SOURCE_BITS} sources, {1 << _FILE_BITS} files "
            f"per source and {1 << _DOC_BITS} documents per file (got source {source}, file "
            f"{file}, document {doc}); split the input into more, smaller files"
        )
    return (source << (_FILE_BITS + _DOC_BITS)) | (file << _DOC_BITS) | doc


def unpack_order(g: int) -> tuple[int, int, int]:
    return (
        g >> (_FILE_BITS + _DOC_BITS),
        (g >> _DOC_BITS) & ((1 << _FILE_BITS) - 1),
        g & ((1 << _DOC_BITS) - 1),
    )


def unit_of(g: int) -> int:
    """The read unit (source and file) of document ``g``, as one int in corpus order."""
    return g >> _DOC_BITS


def unit_file(root: str, g: int, ext: str) -> str:
    """The spill file (``txt`` or ``sig``) of the read unit that holds document ``g``."""
    si, fi, _ = unpack_order(g)
    return f"{root}/{SPILL_DIR}/spill/{si:05d}-{fi:07d}.{ext}"


def token_file(root: str) -> str:
    return f"{root}/{SPILL_DIR}/tokens/{uuid.uuid4().hex}.bin"


class SpillWriter:
    """Appends byte strings to one file; ``write`` returns where each one starts."""

    def __init__(self, path: str):
        self.path, self.pos = path, 0
        if fs.is_remote(path):
            p = fs.as_path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self._f = p.open("wb")
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._f = open(path, "wb")  # noqa: SIM115  (closed by close())

    def write(self, data: bytes) -> int:
        off = self.pos
        self._f.write(data)
        self.pos += len(data)
        return off

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SpillReader:
    """Reads byte ranges of spill files, keeping the last few files open."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._open: OrderedDict = OrderedDict()

    def read(self, path: str, off: int, size: int) -> bytes:
        f = self._open.pop(path, None)
        if f is None:
            f = fs.open_read(path)
            while len(self._open) >= self.keep:
                self._open.popitem(last=False)[1].close()
        self._open[path] = f
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise DataError(
                f"{path}: temporary file is shorter than expected ({len(data)} of {size} bytes "
                f"at {off}); another job may have removed it: rerun with a fresh --out"
            )
        return data

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
