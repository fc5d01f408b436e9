"""The HBM XLA:TPU allocates for a compiled program: the figure its fit check uses.

On TPU, ``memory_analysis()`` overstates a program's memory: its temporaries are larger than the
temporary allocation of XLA's buffer assignment (llama_8b on v6e:16x16 with full remat: 36.1 GB
against 27.1 GB), and its arguments + outputs + temporaries + code (34.5 GiB) exceed a chip
(31.25 GiB) on which XLA accepts the program. XLA checks the allocations of its buffer
assignment in HBM (arguments, outputs and temporaries) plus the generated code: given a
970 MiB limit, a program whose allocations are 963.7 MiB and code 27.7 MiB is refused with
"Used 991.75M of 970.00M hbm" (docs/performance.md). XLA writes those allocations to the
memory-usage report of a dumped compile, which is where this module reads them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from collections.abc import Iterator

_DEFAULT_SPACE = re.compile(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)")


@contextlib.contextmanager
def dump_options() -> Iterator[dict[str, str]]:
    """XLA options that dump one compile into a temporary folder (removed on exit); read the
    allocations with :func:`allocated_bytes` before leaving the block."""
    with tempfile.TemporaryDirectory(prefix="lmtrain-xla-dump-") as folder:
        yield {"xla_dump_to": folder}


def allocated_bytes(options: dict[str, str]) -> int | None:
    """Bytes of HBM (default memory space) in the buffer assignment of the compile dumped with
    ``options``; None when XLA wrote no memory-usage report there."""
    reports = sorted(glob.glob(os.path.join(options["xla_dump_to"], "*memory-usage-report.txt")))
    if not reports:
        return None
    # one compile writes one optimized module; its report names every memory space's total
    with open(reports[-1]) as f:
        found = _DEFAULT_SPACE.search(f.read())
    return int(found.group(1)) if found else None
