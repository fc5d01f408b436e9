"""One emulated CPU device per host core for ``lmtrain train`` when the user chose nothing.

XLA:CPU runs one device's ops largely on one thread, so a single-device run leaves the other cores
idle; emulating one device per core (``--xla_force_host_platform_device_count``) runs the batch
data-parallel over all of them. The flag must be in ``XLA_FLAGS`` before JAX creates its CPU
client, so the CLI calls ``apply_default`` before anything imports jax. A user's own ``XLA_FLAGS``
are kept (the flag is appended); a user who set the count, or ``JAX_PLATFORMS`` without cpu, is
left alone. On an accelerator host the flag only sizes the unused CPU backend.
"""

from __future__ import annotations

import glob
import os

FLAG = "--xla_force_host_platform_device_count"

# Set by apply_default when it chose the count; the train loop's console line reports it.
_applied: int | None = None


def host_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup cpusets), not the machine's total."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


def _accelerator_present() -> bool:
    # Device nodes of NVIDIA GPUs and TPUs (v4+ /dev/accel*, earlier VFIO); the CPU count then
    # does not matter and is left at JAX's default.
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*"))


def _data_shards(shape, n: int) -> int | None:
    """data x fsdp size of mesh ``shape`` on ``n`` devices (None if it does not fit)."""
    fixed = 1
    for s in shape:
        fixed *= 1 if s == -1 else s
    if -1 in shape:
        if n % fixed:
            return None
        shape = [n // fixed if s == -1 else s for s in shape]
    elif fixed != n:
        return None
    return shape[0] * shape[1]


def device_count_for(cfg, cores: int) -> int:
    """The largest count <= ``cores`` whose mesh divides the config's batches (1 at worst).

    ``mesh.num_devices`` set by the user wins; otherwise a count that leaves
    ``train.global_batch_size`` indivisible would turn "use every core" into a config error
    (e.g. the shakespeare batch of 12 on 8 cores runs on 6)."""
    if cfg.mesh.num_devices:
        return max(int(cfg.mesh.num_devices), 1)
    t = cfg.train
    for n in range(cores, 0, -1):
        shards = _data_shards(tuple(cfg.mesh.shape), n)
        if shards is None:
            continue
        if t.global_batch_size % (shards * t.microbatches):
            continue
        if (t.eval_batch_size or t.global_batch_size) % shards:
            continue
        return n
    return 1


def apply_default(cfg, environ=os.environ) -> int | None:
    """Appends ``FLAG=<n>`` to ``XLA_FLAGS`` unless the user decided; returns n or None."""
    global _applied
    if FLAG in environ.get("XLA_FLAGS", ""):
        return None
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.lower().split(","):
        return None
    if not platforms and _accelerator_present():
        return None
    n = device_count_for(cfg, host_cores())
    if n <= 1:
        return None
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {FLAG}={n}".strip()
    _applied = n
    return n


def console_note(backend: str) -> str:
    """`` (one CPU device per core: ...)`` for the train loop's first line when the default
    applies to this run's CPU backend, else ``''``."""
    if _applied is None or backend != "cpu":
        return ""
    return (
        f" (CPU: {_applied} emulated devices for {host_cores()} cores; "
        f"set XLA_FLAGS={FLAG}=N to choose)"
    )
