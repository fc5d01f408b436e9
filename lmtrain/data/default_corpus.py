"""The embedded default corpus: the Python standard library's own source files.

Every Python install carries a few tens of MB of real, carefully written, PSF-licensed text: the
``.py`` files under ``sysconfig.get_paths()['stdlib']``. That makes ``lmtrain data prepare`` work
out of the box with no download. Files are taken in sorted relative-path order; ``site-packages``,
``dist-packages`` and ``__pycache__`` are skipped, and so are test suites (``test``, ``tests``,
``idle_test`` directories) unless ``include_tests=True`` (they hold deliberately malformed files,
fixtures and generated data). ``max_files`` / ``max_bytes`` cap the corpus (0 = no cap).

``mode``: ``source`` (each file is one document), ``docstrings`` (each file's module, class and
function docstrings, extracted with ``ast``, as one prose document) or ``both``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig

from lmtrain.data.sources import ErrorPolicy, RawDoc

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}
LICENCE = "PSF-2.0"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str, include_tests: bool = False) -> list[str]:
    """Relative paths of the stdlib ``.py`` files, sorted."""
    skip = SKIP_DIRS | (set() if include_tests else TEST_DIRS)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for fn in filenames:
            if fn.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, fn), root))
    return sorted(out)


def extract_docstrings(source: str) -> str | None:
    """Module, class and function docstrings in source order, ``name:`` headed; None if the file
    does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                line = getattr(node, "lineno", 0)
                head = "" if isinstance(node, ast.Module) else f"{node.name}:\n"
                parts.append((line, head + doc))
    parts.sort(key=lambda p: p[0])
    return "\n\n".join(p[1] for p in parts)


class StdlibSource:
    """Streams the stdlib files as documents; ``self.files`` records each file's sha256."""

    def __init__(self, spec: dict, policy: ErrorPolicy):
        self.spec, self.policy = spec, policy
        self.root = spec["data_dir"] or stdlib_root()
        self.files: list[dict] = []
        self.decode_counts: dict = {}

    def __iter__(self):
        s = self.spec
        total = 0
        modes = {"source": ("code",), "docstrings": ("pydoc",), "both": ("code", "pydoc")}[
            s["mode"]
        ]
        for i, rel in enumerate(stdlib_files(self.root, s["include_tests"])):
            if s["max_files"] and i >= s["max_files"]:
                break
            if s["max_bytes"] and total >= s["max_bytes"]:
                break
            full = os.path.join(self.root, rel)
            try:
                with open(full, "rb") as f:
                    data = f.read()
            except OSError as e:
                self.policy(
                    "unreadable_file",
                    f"{full}: cannot read ({e}); fix permissions or set include_tests",
                )
                continue
            total += len(data)
            entry = {
                "path": rel,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "documents": 0,
            }
            self.files.append(entry)
            nul = data.find(b"\x00", 0, 8192)
            if nul >= 0:
                self.policy("binary_file", f"{full}: looks binary (NUL byte at offset {nul})")
                continue
            for fmt in modes:
                suffix = "" if fmt == "code" else "#docstrings"
                entry["documents"] += 1
                yield RawDoc(
                    f"{s['name']}:{rel}{suffix}",
                    s["name"],
                    full,
                    0,
                    s["licence"] or LICENCE,
                    fmt,
                    data,
                )
