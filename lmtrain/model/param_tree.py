"""Nested param dicts <-> flat ``"a/b/c"`` names, the layout of safetensors files we write."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a": {"b": x}}`` → ``{"a/b": np.asarray(x)}``."""
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = np.asarray(v)
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """The inverse of :func:`flatten`."""
    tree: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
