"""Progress lines for long data runs: documents/s, MB/s and ETA, at most every ``every`` seconds.

The ETA divides the bytes still to read by the rate so far; the total comes from the sources'
file sizes (:func:`estimate_bytes`), and is unknown (no ETA) for TFDS sources.
"""

from __future__ import annotations

import os
import sys
import time

from lmtrain.data.default_corpus import stdlib_files, stdlib_root
from lmtrain.data.sources import ErrorPolicy, list_files


def estimate_bytes(cfg: dict) -> int | None:
    """Sum of the input file sizes, or None when a source's size is unknown (TFDS)."""
    total = 0
    for spec in cfg["sources"]:
        if spec["kind"] == "files":
            for full, _ in list_files(spec, ErrorPolicy("skip")):
                try:
                    total += os.path.getsize(full)
                except OSError:
                    pass
        elif spec["kind"] == "default_corpus":
            root = spec["data_dir"] or stdlib_root()
            files = stdlib_files(root, spec["include_tests"])
            if spec["max_files"]:
                files = files[: spec["max_files"]]
            size = sum(os.path.getsize(os.path.join(root, f)) for f in files)
            total += min(size, spec["max_bytes"]) if spec["max_bytes"] else size
        else:
            return None
    return total


class Progress:
    def __init__(self, total_bytes: int | None, every: float = 10.0, stream=None, label="read"):
        self.total, self.every, self.label = total_bytes, every, label
        self.stream = stream if stream is not None else sys.stderr
        self.docs = self.bytes = 0
        self.t0 = self.last = time.monotonic()

    def update(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        dt = max((now or time.monotonic()) - self.t0, 1e-9)
        rate = self.bytes / dt
        msg = (
            f"[data] {self.label}: {self.docs:,} documents, {self.bytes / 1e6:,.1f} MB, "
            f"{self.docs / dt:,.0f} documents/s, {rate / 1e6:.2f} MB/s"
        )
        if self.total and rate > 0:
            left = max(self.total - self.bytes, 0) / rate
            msg += f", {100 * min(self.bytes / self.total, 1):.0f}% ETA {left:,.0f} s"
        return msg

    def finish(self) -> None:
        """A last line for runs long enough to have printed any."""
        now = time.monotonic()
        if now - self.t0 >= self.every:
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
