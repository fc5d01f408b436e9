"""Persistent XLA compilation cache: a repeat run of a config loads its executables from disk.

A small model's run spends a large share of its wall time compiling (docs/performance.md). JAX's persistent cache keys each executable by its HLO, compile options,
XLA flags and backend, so an edited model or flag simply misses; XLA:CPU also refuses an
executable built for other CPU features and recompiles it. MaxText keeps such a cache on by
default too. ``config.train.compilation_cache_dir = ""`` turns it off.
"""

from __future__ import annotations

import os
import warnings

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

MIN_COMPILE_SECONDS = 0.2  # cache every program whose compile takes longer (JAX defaults to 1 s)
MAX_BYTES = 2 << 30  # least recently used entries go beyond this; writes then take a file lock


def enable(path: str) -> str | None:
    """Point JAX's persistent cache at ``path`` (``~`` expanded); returns the directory or None.

    An unusable directory only costs the cache, never the run: it warns and carries on.
    """
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        warnings.warn(
            f"compilation cache off: cannot use config.train.compilation_cache_dir ({e}); "
            "point it at a writable directory or set it to '' to silence this",
            stacklevel=2,
        )
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        cc.reset_cache()  # JAX opens its cache once: one opened on another directory would stay
    return path
