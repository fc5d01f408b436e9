"""Compile the run's first train call, its eval step and its sampler in background threads.

Started before the state is initialised, these compiles overlap the init compile (and a
checkpoint restore) and each other instead of queueing; the eval and sampler compiles no longer
come mid-run and at the end. XLA:CPU already spreads one compile over more than one core, so
the gain grows with the host's cores (docs/performance.md). A compiled program stays in JAX's cache, so the loop's later call with
arguments of the same shapes runs it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)


class CompileAhead:
    """Runs compile jobs in daemon threads; ``wait()`` before the main thread makes those calls.

    A job that fails only logs: the loop's own call compiles again and raises the error where
    it belongs, with its usual message.
    """

    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self.failed: dict[str, BaseException] = {}

    def start(self, name: str, job: Callable[[], object]) -> None:
        t = threading.Thread(
            target=self._run, args=(name, job), name=f"compile-{name}", daemon=True
        )
        t.start()
        self._threads[name] = t

    def _run(self, name: str, job: Callable[[], object]) -> None:
        try:
            job()
        except Exception as e:  # the main thread's call reports it
            self.failed[name] = e
            log.info("compiling %s ahead failed (%s: %s)", name, type(e).__name__, e)

    def wait(self, *names: str) -> None:
        """Joins the named jobs (all when none are named); unknown names are already done."""
        for name in names or list(self._threads):
            t = self._threads.pop(name, None)
            if t is not None:
                t.join()


def global_spec(batch: dict, sharding, process_count: int) -> dict:
    """ShapeDtypeStructs of the global arrays ``to_global`` makes of one process's host batch."""
    return {
        k: jax.ShapeDtypeStruct(
            (np.shape(v)[0] * process_count, *np.shape(v)[1:]),
            np.asarray(v).dtype,
            sharding=sharding,
        )
        for k, v in batch.items()
    }


def with_shardings(abstract, shardings):
    """The abstract state's ShapeDtypeStructs carrying the shardings the real state will have."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s, weak_type=a.weak_type),
        abstract,
        shardings,
    )
