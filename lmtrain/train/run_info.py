"""What a run directory records at start: the resolved config and a run manifest."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess

import jax

PACKAGES = (
    "lmtrain",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "sentencepiece",
    "numpy",
)


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_version() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def file_sha256(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_run_files(
    workdir: str, config, *, data_dir: str, tokenizer_fingerprint: str, mesh_shape, resumed_from
):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
    manifest = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(),
        "code_version": code_version(),
        "packages": package_versions(),
        "seed": config.seed,
        "data_dir": os.path.abspath(data_dir),
        "data_manifest_sha256": file_sha256(os.path.join(data_dir, "manifest.json")),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "devices": {
            "count": jax.device_count(),
            "kind": jax.devices()[0].device_kind,
            "processes": jax.process_count(),
        },
        "mesh_shape": list(mesh_shape),
        "resumed_from_step": resumed_from,
    }
    name = (
        "run_manifest.json" if resumed_from is None else f"run_manifest.resume_{resumed_from}.json"
    )
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest
