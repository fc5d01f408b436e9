"""Shared fixtures: 8 emulated CPU devices (set before JAX starts), a tiny config and text file."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

from tests.support.tiny import tiny_config, write_tiny_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> str:
    return write_tiny_text(tmp_path_factory.mktemp("text") / "tiny.txt")


@pytest.fixture
def tiny_cfg(tiny_text):
    return tiny_config(tiny_text)


def pytest_collection_modifyitems(items):
    # Whole runs (training, resume, faults, several processes, the notebook) live in tests/e2e;
    # they are marked slow so `-m "not slow"` gives the quick unit layer.
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)
