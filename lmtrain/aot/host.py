"""Backend choice on hosts that have libtpu installed (for ``lmtrain compile``) but no TPU.

jax starts a TPU client at backend initialisation whenever libtpu is importable; without TPU
chips that fails after libtpu has printed warnings about the accelerator type and worker
hostnames, and costs start-up time. Unless the user chose platforms (``JAX_PLATFORMS``), such
a host without another accelerator plugin runs on CPU directly; one with a GPU plugin keeps jax's
own choice, with libtpu's environment set so that it stays quiet.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil

_GPU_PLUGIN_MARKERS = ("cuda", "rocm")


def tpu_chips() -> int:
    """TPU chips attached to this host (jax's own PCI probe; device files as a fallback)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - private API moved: look for the device files instead
        return len(glob.glob("/dev/accel[0-9]*")) + len(glob.glob("/dev/vfio/[0-9]*"))


def gpu_plugin_installed() -> bool:
    """Whether a jax GPU plugin (CUDA or ROCm) is installed."""
    names = [m.name for m in pkgutil.iter_modules()]
    try:
        import jax_plugins

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    return any(
        any(marker in n for marker in _GPU_PLUGIN_MARKERS) and ("jax" in n or "pjrt" in n)
        for n in names
    )


def prefer_cpu_without_tpu() -> str | None:
    """Call before jax's backends start; returns the platform it selected, or None."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return None
    if tpu_chips() > 0:
        return None
    # lazily: this runs at every CLI start, before jax's backends; only a libtpu host needs it
    from lmtrain.aot.topology import quiet_libtpu

    quiet_libtpu()
    if gpu_plugin_installed():
        return None
    import jax

    if jax.config.jax_platforms:  # set in code by the caller
        return None
    jax.config.update("jax_platforms", "cpu")
    return "cpu"
