"""The layer contracts of .importlinter (issue 19): kept today, broken by a new upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[3])
LINT = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which(
    "lint-imports"
)
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter (dev extra) not installed")


def lint(root: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run(
        [LINT, "--no-cache", os.path.join(root, ".importlinter")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layer_contracts_are_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_a_new_upward_import_breaks_the_layers_contract(tmp_path):
    shutil.copytree(os.path.join(ROOT, "lmtrain"), tmp_path / "lmtrain")
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    path = tmp_path / "lmtrain" / "model" / "transformer.py"
    path.write_text(path.read_text() + "\nfrom lmtrain.serve import engine  # noqa: E402,F401\n")
    out = lint(str(tmp_path))
    assert out.returncode == 1
    assert "lmtrain.model.transformer is not allowed to import lmtrain.serve" in out.stdout
    assert "lmtrain.model.transformer -> lmtrain.serve.engine" in out.stdout


def test_every_model_module_is_in_a_layer():
    """The model layer lists its modules one by one (``lmtrain.model.config`` sits lower), so a new
    module must be added to .importlinter or it would escape the contract."""
    text = open(os.path.join(ROOT, ".importlinter")).read()
    model_dir = os.path.join(ROOT, "lmtrain", "model")
    names = sorted(
        f[:-3] for f in os.listdir(model_dir) if f.endswith(".py") and f != "__init__.py"
    )
    missing = [n for n in names if f"lmtrain.model.{n} " not in text + " "]
    missing = [n for n in missing if f"lmtrain.model.{n}\n" not in text]
    assert not missing, f"add to a layer in .importlinter: {missing}"
