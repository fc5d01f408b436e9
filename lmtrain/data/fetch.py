"""``lmtrain data fetch NAME``: the public data sets the configs use, checked against pinned hashes.

One table names each file's upstream URL, licence and SHA-256. A file is written only after its
bytes hash to the pinned value (temp file in the destination folder, then an atomic rename), so a
cut connection or a wrong mirror never leaves a partial or different file where a config reads.
Where it comes from, in order: ``--from FILE_OR_URL``; else ``$LMTRAIN_DATA_MIRROR/<file>`` when
that variable names a folder holding the file (machines without internet keep a copy there);
else the upstream URL. A file already present with the pinned hash is left alone.

    lmtrain data fetch tinyshakespeare              # -> data/tinyshakespeare.txt
    lmtrain data fetch all --out data
    lmtrain data fetch tinyshakespeare --from ~/Downloads/input.txt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmtrain.errors import DataError

MIRROR_ENV = "LMTRAIN_DATA_MIRROR"
DEFAULT_DIR = "data"  # relative to the working directory: the repository root in the README


@dataclass(frozen=True)
class PublicFile:
    name: str
    filename: str
    url: str
    sha256: str
    size: int
    licence: str
    what: str


DATASETS: dict[str, PublicFile] = {
    f.name: f
    for f in (
        PublicFile(
            name="tinyshakespeare",
            filename="tinyshakespeare.txt",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1_115_394,
            licence="public domain text (karpathy/char-rnn, MIT repository)",
            what="Shakespeare's works concatenated; nanoGPT's shakespeare_char benchmark",
        ),
        PublicFile(
            name="hh-rlhf-harmless",
            filename="hh_rlhf_harmless_test.jsonl.gz",
            # Git LFS in the upstream repository: media.githubusercontent.com serves the content.
            url="https://media.githubusercontent.com/media/anthropics/hh-rlhf/master/harmless-base/test.jsonl.gz",
            sha256="ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
            size=742_801,
            licence="MIT (anthropics/hh-rlhf)",
            what="2,312 harmless-base test preference pairs {chosen, rejected}",
        ),
        PublicFile(
            name="alpaca-seed-tasks",
            filename="alpaca_seed_tasks.jsonl",
            url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/seed_tasks.jsonl",
            sha256="7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
            size=110_934,
            licence="Apache-2.0 (tatsu-lab/stanford_alpaca code); data for research use",
            what="175 human-written instruction tasks (Self-Instruct seed set)",
        ),
    )
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _is_url(s: str) -> bool:
    return s.split("://", 1)[0] in ("http", "https", "file") and "://" in s


def _copy_into(src: str, fh) -> None:
    if _is_url(src):
        try:
            with urllib.request.urlopen(src, timeout=60) as r:
                shutil.copyfileobj(r, fh, 1 << 20)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(
                f"could not download {src}: {e}; with no internet, copy the file here by other "
                f"means and pass --from FILE, or set {MIRROR_ENV} to a folder holding it"
            ) from e
    else:
        try:
            with open(src, "rb") as r:
                shutil.copyfileobj(r, fh, 1 << 20)
        except OSError as e:
            raise DataError(f"--from {src}: {e.strerror or e}") from e


def install(spec: PublicFile, src: str, dest: Path) -> None:
    """Copies ``src`` (path or URL) to ``dest`` only if its SHA-256 is the pinned one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            _copy_into(src, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data from other users of the checkout
        got = _sha256(Path(tmp))
        if got != spec.sha256:
            raise DataError(
                f"{src}: sha256 {got} does not match the pinned sha256 {spec.sha256} of "
                f"{spec.name} ({spec.url}); the copy is corrupt or a different version: "
                "nothing was written"
            )
        os.replace(tmp, dest)  # atomic on one filesystem: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(
    name: str,
    out_dir: str | os.PathLike = DEFAULT_DIR,
    source: str | None = None,
    *,
    force: bool = False,
    print_fn: Callable[[str], None] = print,
) -> Path:
    """Installs data set ``name`` as ``out_dir/<filename>`` and returns that path."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)} (or all)")
    spec = DATASETS[name]
    dest = Path(out_dir) / spec.filename
    if dest.is_file():
        have = _sha256(dest)
        if have == spec.sha256:
            print_fn(f"{dest}: present, sha256 matches ({spec.name})")
            return dest
        if not force:
            raise DataError(
                f"{dest} exists with sha256 {have}, not the pinned {spec.sha256} of {spec.name}: "
                "move it away or pass --force to replace it"
            )
    if source is None:
        mirror = os.environ.get(MIRROR_ENV)
        if mirror and (Path(mirror) / spec.filename).is_file():
            source = str(Path(mirror) / spec.filename)
        else:
            source = spec.url
    print_fn(f"{spec.name}: {source} -> {dest}")
    install(spec, source, dest)
    print_fn(f"{dest}: {spec.size:,} bytes, sha256 {spec.sha256} verified; licence: {spec.licence}")
    return dest


def missing_hint(path: str | os.PathLike) -> str:
    """``'; get it with `lmtrain data fetch NAME`'`` when ``path`` is a file of the table."""
    base = os.path.basename(os.fspath(path))
    for spec in DATASETS.values():
        if base == spec.filename:
            out = os.path.dirname(os.fspath(path)) or "."
            extra = "" if os.path.normpath(out) == DEFAULT_DIR else f" --out {out}"
            return f"; get it with `lmtrain data fetch {spec.name}{extra}`"
    return ""


def cmd_fetch(args: argparse.Namespace, overrides: list[str]) -> None:
    names = list(DATASETS) if args.name == "all" else [args.name]
    if args.source and len(names) > 1:
        raise DataError("--from names one file: fetch one data set at a time with it")
    for name in names:
        fetch(name, args.out, args.source, force=args.force)


def add_fetch_parser(dsub) -> None:
    """``lmtrain data fetch`` under the ``data`` command's subparsers."""
    table = "\n".join(f"  {s.name:18} {s.filename:32} {s.licence}" for s in DATASETS.values())
    p = dsub.add_parser(
        "fetch",
        help="download a public data set the configs use, verified against its pinned SHA-256",
        description=f"Data sets:\n{table}\n\nSources in order: --from, ${MIRROR_ENV}/<file>, "
        "the upstream URL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=[*DATASETS, "all"])
    p.add_argument("--out", default=DEFAULT_DIR, help="folder to write into (default: data)")
    p.add_argument(
        "--from", dest="source", default=None, help="a local copy or URL to install instead"
    )
    p.add_argument("--force", action="store_true", help="replace a file whose hash differs")
    p.set_defaults(fn=cmd_fetch)
