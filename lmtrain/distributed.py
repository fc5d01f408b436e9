"""Multi-host start: ``jax.distributed.initialize`` when the config or the environment asks."""

from __future__ import annotations

import os

import jax

_ENV_HINTS = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)
_initialized = False


def maybe_initialize(dist_cfg) -> None:
    """``yes``: always (explicit address/count/id, or auto-detected); ``auto``: if a cluster env is set."""
    global _initialized
    if _initialized or dist_cfg.initialize == "no":
        return
    if dist_cfg.initialize == "auto" and not any(os.environ.get(k) for k in _ENV_HINTS):
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
