"""Output paths: local directories and object-store URIs (``gs://``, ``s3://`` ...) alike.

Everything the data stage writes goes through :mod:`etils.epath` (the path library TFDS and
orbax use; its backends reach GCS and S3 when ``gcsfs``/``s3fs`` or TensorFlow are installed),
so the Beam job's workers and the local runner write buckets the same way as disks.

Object stores have no atomic directory rename: a local output is still built in a hidden sibling
and renamed into place, a remote one is built locally (local runner) or written in place (Beam
workers) and is complete when ``manifest.json`` exists — it is written last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from etils import epath

from lmtrain.errors import DataError


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``scheme://`` URIs (gs, s3, ...), False for local paths."""
    return "://" in str(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def check_empty(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuses a file, or a non-empty directory unless ``overwrite``."""
    p = as_path(out)
    if not p.exists():
        return
    if not p.is_dir():
        raise DataError(f"output {out} exists and is a file; choose a directory path")
    if any(True for _ in p.iterdir()) and not overwrite:
        raise DataError(
            f"output {out} already exists and is not empty; choose another directory or pass overwrite=True"
        )


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def upload_file(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copies a local file to ``dest`` (any scheme), creating parent directories."""
    d = as_path(dest)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src, d.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def upload_tree(local_dir: str | os.PathLike, dest: str | os.PathLike, overwrite: bool) -> None:
    """Copies a finished local output directory to ``dest``; ``manifest.json`` goes last, so a
    reader that sees it sees a complete dataset."""
    root = Path(local_dir)
    d = as_path(dest)
    if overwrite and d.exists():
        d.rmtree()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "manifest.json")
    for f in files:
        upload_file(f, d / f.relative_to(root).as_posix())


def open_read(path: str | os.PathLike):
    """A binary file object for reading: the builtin ``open`` for local paths."""
    return as_path(path).open("rb") if is_remote(path) else open(path, "rb")  # noqa: SIM115


def size(path: str | os.PathLike) -> int:
    return int(as_path(path).stat().length) if is_remote(path) else os.path.getsize(path)


def sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def remote_files(pattern: str) -> list[tuple[str, str]] | None:
    """(URI, display path) of the files under a remote directory (hidden entries skipped, sorted),
    the file itself, or the matches of a ``*`` glob; None when nothing is there."""
    p = as_path(pattern)
    if p.is_dir():
        root = str(p).rstrip("/")
        parent = root.rsplit("/", 1)[0]
        out = []
        for dirpath, dirnames, filenames in p.walk():
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if not fn.startswith("."):
                    full = f"{str(dirpath).rstrip('/')}/{fn}"
                    out.append((full, full[len(parent) + 1 :]))
        return sorted(out)
    if p.exists():
        return [(str(p), p.name)]
    if any(c in pattern for c in "*?["):
        hits = sorted(str(h) for h in p.parent.glob(p.name))
        return [(h, h) for h in hits] or None
    return None


def listdir(path: str | os.PathLike) -> list[str]:
    p = as_path(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
