"""The public data sets for tests marked ``needs_public_data``, through ``lmtrain data fetch``.

Order: ``data/<file>`` in the repository (after ``lmtrain data fetch NAME``), else the folder in
``$LMTRAIN_DATA_MIRROR`` (CI points it at its copy), installed into a temporary folder with the
same SHA-256 check a user's fetch does. Neither: the test is skipped with the command to run.
The network is never tried here; everything these tests assert about parsing is also asserted on
generated records elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from lmtrain.data.fetch import DATASETS, MIRROR_ENV, fetch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "data"
# The first 7,476 characters of tinyshakespeare (public domain; see tests/support/data/README.md).
SHAKESPEARE_HEAD = FIXTURES / "tinyshakespeare_head.txt"

needs_public_data = pytest.mark.needs_public_data
_cache: dict[str, Path] = {}


def public_file(name: str) -> Path:
    """The verified file of data set ``name``, or ``pytest.skip`` naming how to get it."""
    if name in _cache:
        return _cache[name]
    spec = DATASETS[name]
    quiet = lambda _: None  # noqa: E731
    if (REPO / "data" / spec.filename).is_file():
        path = fetch(name, REPO / "data", print_fn=quiet)  # checks the hash; a mismatch fails
    else:
        mirror = os.environ.get(MIRROR_ENV)
        if not mirror or not (Path(mirror) / spec.filename).is_file():
            pytest.skip(
                f"needs_public_data: {spec.filename} is not in data/ nor in ${MIRROR_ENV}; "
                f"run `lmtrain data fetch {name}` to include this test"
            )
        path = fetch(name, tempfile.mkdtemp(prefix="lmtrain-public-"), print_fn=quiet)
    _cache[name] = path
    return path
