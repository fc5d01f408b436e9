"""Raw document sources, streamed one document at a time (memory bounded by the largest document).

A source spec (``config.sources[i]``, defaults in ``prepare_config.source_defaults``) has a
``kind``:

* ``files``: ``paths`` are files, directories (walked recursively in sorted order, hidden entries
  skipped, only ``extensions``) or globs. ``.txt``/``.md``/``.html``/``.htm`` (and any other suffix
  named explicitly) are one document per file, or paragraph groups of about ``segment_chars``
  characters with ``segment='paragraphs'`` (streamed line by line, so one huge file works too).
  ``.jsonl``/``.jsonl.gz`` are one document per line (``text_field``, optional ``id_field`` and
  ``time_field``); ``.parquet`` is read in row batches of ``parquet_batch_rows`` with pyarrow.
* ``tfds``: ``tfds.data_source(tfds_name, data_dir=..., split=...)`` of an already prepared
  ArrayRecord TFDS dataset (no TensorFlow needed); ``text_field`` names the feature.
* ``default_corpus``: the Python standard library sources (``lmtrain/data/default_corpus.py``).

Bad input (unreadable or binary file, malformed JSON line, missing field, invalid UTF-8 when
``normalize.invalid_utf8='error'``) goes to an :class:`ErrorPolicy`: ``on_error='stop'`` raises a
:class:`DataError` naming the file and line; ``'skip'`` counts it by reason and goes on.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from lmtrain.data import fs
from lmtrain.data.normalize import decode_utf8
from lmtrain.data.shards import sha256_file
from lmtrain.errors import DataError

FORMATS = {
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".py": "code",
}


class RawDoc(NamedTuple):
    id: str
    source: str
    path: str  # file the document came from (for messages)
    line: int  # 1-based line where it starts (0: whole file)
    licence: str
    fmt: str  # text | markdown | html | code | pydoc | auto
    data: bytes | str  # bytes are decoded by the cleaner (per normalize.invalid_utf8)
    time: object = None


class ErrorPolicy:
    """``stop``: raise a DataError; ``skip``: count the reason (and keep a few messages)."""

    def __init__(self, mode: str):
        if mode not in ("stop", "skip"):
            raise DataError(f"on_error={mode!r}: use 'stop' or 'skip'")
        self.mode = mode
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def __call__(self, reason: str, message: str) -> None:
        if self.mode == "stop":
            raise DataError(f"{message}; or set on_error='skip' to count and skip such input")
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)


def decoded(res, loc: str, policy: ErrorPolicy, counts: Counter) -> str | None:
    """Text of a :func:`decode_utf8` result; counts repairs/drops, reports invalid input."""
    if res.status == "repaired":
        counts["invalid_utf8_repaired"] += 1
    elif res.status == "dropped":
        counts["invalid_utf8_dropped"] += 1
    elif res.status == "invalid":
        policy(
            "invalid_utf8",
            f"{loc}: invalid UTF-8 (byte 0x{res.byte:02x} at column {res.column}); re-encode "
            "it as UTF-8 or set normalize.invalid_utf8='replace' (repair) or 'drop'",
        )
    return res.text


def decode_field(value, invalid_utf8: str, loc: str, policy: ErrorPolicy, counts: Counter):
    """A str field as is; bytes decoded per ``invalid_utf8``."""
    if isinstance(value, str):
        return value
    return decoded(decode_utf8(bytes(value), invalid_utf8), loc, policy, counts)


def _suffix(path: str) -> str:
    name = path.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else os.path.splitext(name)[1]


def list_files(spec: dict, policy: ErrorPolicy) -> list[tuple[str, str]]:
    """(absolute path, display path) for every file of a ``files`` source, deterministic order."""
    exts = tuple(e.lower() for e in spec["extensions"])
    out: list[tuple[str, str]] = []
    for pattern in spec["paths"]:
        pattern = os.path.expanduser(str(pattern))
        if fs.is_remote(pattern):  # gs://, s3:// ... through etils.epath
            hits = fs.remote_files(pattern)
            if hits is None:
                policy("missing_path", f"source {spec['name']!r}: {pattern} does not exist; fix its paths")  # fmt: skip
            else:
                out.extend((full, shown) for full, shown in hits if _suffix(full) in exts or full == pattern)  # fmt: skip
        elif os.path.isdir(pattern):
            root = os.path.abspath(pattern)
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    full = os.path.join(dirpath, fn)
                    if not fn.startswith(".") and _suffix(fn) in exts:
                        out.append((full, os.path.relpath(full, os.path.dirname(root))))
        elif os.path.isfile(pattern):
            out.append((os.path.abspath(pattern), os.path.basename(pattern)))
        elif glob.has_magic(pattern):
            hits = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not hits:
                policy(
                    "missing_path",
                    f"source {spec['name']!r}: glob {pattern} matches no file; fix its paths",
                )
            out.extend((os.path.abspath(p), p) for p in hits)
        else:
            policy(
                "missing_path", f"source {spec['name']!r}: {pattern} does not exist; fix its paths"
            )
    seen, unique = set(), []
    for full, shown in out:
        if full not in seen:
            seen.add(full)
            unique.append((full, shown))
    return unique


class FileSource:
    """Documents from files; ``self.files`` records path, size, sha256 and documents per file."""

    def __init__(
        self, spec: dict, policy: ErrorPolicy, invalid_utf8: str = "replace", time_field: str = ""
    ):
        self.spec, self.policy, self.invalid_utf8 = spec, policy, invalid_utf8
        self.time_field = spec["time_field"] or time_field
        self.files: list[dict] = []
        self.decode_counts: Counter = Counter()  # invalid UTF-8 handled while reading JSONL/parquet

    def __iter__(self):
        for full, shown in list_files(self.spec, self.policy):
            yield from self.iter_file(full, shown)

    def iter_file(self, full: str, shown: str):
        """The documents of one file (the Beam runner reads files in parallel with this)."""
        suffix = _suffix(full)
        entry = {"path": full, "bytes": 0, "sha256": "", "documents": 0}
        try:
            entry["bytes"] = fs.size(full)
            if suffix in (".jsonl", ".jsonl.gz"):
                gen = self._jsonl(full, shown, suffix == ".jsonl.gz")
            elif suffix == ".parquet":
                gen = self._parquet(full, shown)
            elif self.spec["segment"] == "paragraphs":
                gen = self._paragraphs(full, shown)
            else:
                gen = self._whole(full, shown, entry)
            for doc in gen:
                entry["documents"] += 1
                yield doc
            if not entry["sha256"]:
                entry["sha256"] = fs.sha256(full)
        except (OSError, EOFError, zlib.error) as e:
            self.policy(
                "unreadable_file",
                f"{full}: cannot read ({type(e).__name__}: {e}); fix or remove the file",
            )
            entry["error"] = f"{type(e).__name__}: {e}"
        self.files.append(entry)

    def _doc(self, doc_id, path, line, fmt, data, time=None) -> RawDoc:
        s = self.spec
        return RawDoc(f"{s['name']}:{doc_id}", s["name"], path, line, s["licence"], fmt, data, time)

    def _fmt(self, full: str) -> str:
        return (
            self.spec["format"]
            if self.spec["format"] != "auto"
            else FORMATS.get(_suffix(full), "text")
        )

    def _whole(self, full, shown, entry):
        size = entry["bytes"]
        if size > self.spec["max_doc_bytes"]:
            self.policy(
                "file_too_large",
                f"{full}: {size} bytes is more than the source's max_doc_bytes={self.spec['max_doc_bytes']}; "
                "set segment='paragraphs' to split it into documents, or raise max_doc_bytes",
            )
            return
        with fs.open_read(full) as f:
            data = f.read()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        nul = data.find(b"\x00", 0, 8192)
        if nul >= 0:
            self.policy(
                "binary_file",
                f"{full}: looks binary (NUL byte at offset {nul}); remove it from the source paths",
            )
            return
        yield self._doc(shown, full, 0, self._fmt(full), data)

    def _paragraphs(self, full, shown):
        target, fmt = self.spec["segment_chars"], self._fmt(full)
        buf: list[bytes] = []
        size, start, line_no = 0, 1, 0
        with fs.open_read(full) as f:
            head = f.read(8192)
            nul = head.find(b"\x00")
            if nul >= 0:
                self.policy(
                    "binary_file",
                    f"{full}: looks binary (NUL byte at offset {nul}); remove it from the source paths",
                )
                return
            f.seek(0)
            for line_no, line in enumerate(f, 1):
                if not buf:
                    start = line_no
                buf.append(line)
                size += len(line)
                if size >= target and not line.strip():
                    yield self._doc(f"{shown}#L{start}", full, start, fmt, b"".join(buf))
                    buf, size = [], 0
        if buf and b"".join(buf).strip():
            yield self._doc(f"{shown}#L{start}", full, start, fmt, b"".join(buf))

    def _jsonl(self, full, shown, gz):
        field, id_field = self.spec["text_field"], self.spec["id_field"]
        fmt = self.spec["format"] if self.spec["format"] != "auto" else "auto"
        with fs.open_read(full) as raw, gzip.open(raw, "rb") if gz else raw as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if b"\x00" in raw:
                    self.policy(
                        "binary_file",
                        f"{full}:{line_no}: NUL byte in a JSON line (binary data?); fix or remove the line",
                    )
                    continue
                res = decode_utf8(raw, self.invalid_utf8, line_no)
                line = decoded(res, f"{full}:{line_no}", self.policy, self.decode_counts)
                if line is None:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    self.policy(
                        "malformed_jsonl",
                        f"{full}:{line_no}: malformed JSON ({e.msg} at column {e.colno}); fix or delete the line",
                    )
                    continue
                except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting 3000 deep
                    self.policy(
                        "malformed_jsonl",
                        f"{full}:{line_no}: unreadable JSON ({type(e).__name__}: {str(e)[:80]}); fix or delete the line",
                    )
                    continue
                text = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    keys = (
                        ", ".join(sorted(obj)[:10]) if isinstance(obj, dict) else type(obj).__name__
                    )
                    self.policy(
                        "missing_text_field",
                        f"{full}:{line_no}: no string field {field!r} (found: {keys}); set the source's text_field",
                    )
                    continue
                doc_id = (
                    f"{obj[id_field]}" if id_field and id_field in obj else f"{shown}:{line_no}"
                )
                time = obj.get(self.time_field) if self.time_field else None
                yield self._doc(doc_id, full, line_no, fmt, text, time)

    def _parquet(self, full, shown):
        import pyarrow.parquet as pq

        field, id_field, tf = self.spec["text_field"], self.spec["id_field"], self.time_field
        fmt = self.spec["format"] if self.spec["format"] != "auto" else "auto"
        pf = pq.ParquetFile(fs.open_read(full) if fs.is_remote(full) else full)
        names = pf.schema_arrow.names
        if field not in names:
            self.policy(
                "missing_text_field",
                f"{full}: no column {field!r} (columns: {', '.join(names[:10])}); set the source's text_field",
            )
            return
        cols = [field] + [c for c in (id_field, tf) if c and c in names and c != field]
        row = 0
        for batch in pf.iter_batches(batch_size=self.spec["parquet_batch_rows"], columns=cols):
            data = {c: batch.column(c).to_pylist() for c in cols}
            for i, value in enumerate(data[field]):
                row += 1
                if value is None:
                    self.policy(
                        "missing_text_field",
                        f"{full}: row {row}: {field!r} is null; fill or drop the row",
                    )
                    continue
                loc = f"{full}: row {row}"
                text = decode_field(value, self.invalid_utf8, loc, self.policy, self.decode_counts)
                if text is None:
                    continue
                doc_id = f"{data[id_field][i]}" if id_field in data else f"{shown}:row{row}"
                yield self._doc(doc_id, full, row, fmt, text, data[tf][i] if tf in data else None)


class TfdsSource:
    """Records of a prepared ArrayRecord TFDS dataset, read through ``tfds.data_source``."""

    def __init__(
        self, spec: dict, policy: ErrorPolicy, invalid_utf8: str = "replace", time_field: str = ""
    ):
        self.spec, self.policy, self.invalid_utf8 = spec, policy, invalid_utf8
        self.time_field = spec["time_field"] or time_field
        self.files: list[dict] = []
        self.decode_counts: Counter = Counter()

    def __iter__(self):
        import tensorflow_datasets as tfds

        s = self.spec
        name, split, data_dir = s["tfds_name"], s["split"], s["data_dir"] or None
        try:
            ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError ...)
            raise DataError(
                f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir}) cannot be opened: "
                f"{type(e).__name__}: {e}. Prepare it first with file_format='array_record'"
            ) from None
        self._record_files(tfds, name, data_dir)
        for i in range(len(ds)):
            rec = ds[i]
            if s["text_field"] not in rec:
                raise DataError(
                    f"TFDS {name}: no feature {s['text_field']!r} (features: {', '.join(rec)}); set text_field"
                )
            text = decode_field(
                rec[s["text_field"]],
                self.invalid_utf8,
                f"tfds:{name}/{split} record {i}",
                self.policy,
                self.decode_counts,
            )
            if text is None:
                continue
            doc_id = f"{name}/{split}:{i}"
            if s["id_field"] and s["id_field"] in rec:
                v = rec[s["id_field"]]
                doc_id = v.decode() if isinstance(v, bytes) else str(v)
            time = rec.get(self.time_field) if self.time_field else None
            if isinstance(time, bytes):
                time = time.decode()
            yield RawDoc(f"{s['name']}:{doc_id}", s["name"], f"tfds:{name}/{split}", i + 1, s["licence"],
                         s["format"] if s["format"] != "auto" else "auto", text, time)  # fmt: skip

    def _record_files(self, tfds, name, data_dir) -> None:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            root = Path(str(builder.data_dir))
        except Exception:
            return
        for p in sorted(root.iterdir()):
            if p.is_file():
                self.files.append(
                    {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                )


def open_source(
    spec: dict, policy: ErrorPolicy, invalid_utf8: str = "replace", time_field: str = ""
):
    kind = spec["kind"]
    if kind == "files":
        return FileSource(spec, policy, invalid_utf8, time_field)
    if kind == "tfds":
        return TfdsSource(spec, policy, invalid_utf8, time_field)
    if kind == "default_corpus":
        # here, not at the top: default_corpus builds its source on this module's classes
        from lmtrain.data.default_corpus import StdlibSource

        return StdlibSource(spec, policy)
    raise DataError(
        f"source {spec.get('name')!r}: kind={kind!r}; use files, tfds or default_corpus"
    )
