"""notebooks/quickstart.ipynb executes top to bottom (nbclient) and its loss goes down."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # end-to-end: trains, resumes or runs processes

ROOT = str(Path(__file__).resolve().parents[2])


def test_quickstart_notebook_executes():
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    env_before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = ""  # one CPU device in the kernel, as a user would have
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
        ).execute()
    finally:
        if env_before is None:
            os.environ.pop("XLA_FLAGS")
        else:
            os.environ["XLA_FLAGS"] = env_before
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", outputs).groups())
    assert last < first
    assert "ROMEO:" in outputs and "parameters" in outputs
