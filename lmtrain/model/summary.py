"""The model summary: one row per parameter (name, shape, dtype, size) and the total.

Built by ``clu.parameter_overview`` from shapes alone, so it works on the abstract params of a run
before anything is initialised and never fetches sharded values to the host.
"""

from __future__ import annotations

import os
from typing import Any

from clu import parameter_overview
from flax.linen import meta

SUMMARY_FILE = "params.txt"


def parameter_table(params: Any) -> str:
    """The table, ending in ``Total: N -- B bytes``; ``params`` may hold arrays or
    ``jax.ShapeDtypeStruct`` leaves, boxed (logical axis names) or not."""
    # No statistics: they would read every value, which abstract or sharded params cannot give.
    return parameter_overview.get_parameter_overview(meta.unbox(params), include_stats=False)


def count_parameters(params: Any) -> int:
    return int(parameter_overview.count_parameters(meta.unbox(params)))


def write_parameter_table(params: Any, workdir: str) -> str:
    """Write the table to ``workdir/params.txt`` (temp file, then rename); returns the path."""
    path = os.path.join(workdir, SUMMARY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(parameter_table(params) + "\n")
    os.replace(tmp, path)
    return path
