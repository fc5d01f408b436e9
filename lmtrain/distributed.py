"""Multi-host start: ``jax.distributed.initialize`` when the config or the environment asks."""

from __future__ import annotations

import os

import jax

_ENV_HINTS = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
)
_initialized = False


def cluster_env_hint() -> str | None:
    """The environment variable that says this process is one of several, or None.

    ``TPU_WORKER_HOSTNAMES`` counts only when it lists more than one host: a single-host value is
    what a one-host TPU VM (or ``lmtrain compile``'s libtpu set-up on a CPU host) carries, and one
    process needs no coordinator.
    """
    for key in _ENV_HINTS:
        if os.environ.get(key):
            return key
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return "TPU_WORKER_HOSTNAMES" if len(hosts) > 1 else None


def maybe_initialize(dist_cfg) -> None:
    """``yes``: always (explicit address/count/id, or auto-detected); ``auto``: if a cluster env is set."""
    global _initialized
    if _initialized or dist_cfg.initialize == "no":
        return
    if dist_cfg.initialize == "auto" and cluster_env_hint() is None:
        return
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    if dist_cfg.num_processes:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    jax.distributed.initialize(**kwargs)
    _initialized = True
