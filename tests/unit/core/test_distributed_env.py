"""When ``distributed.initialize=auto`` starts ``jax.distributed``: only on a multi-process env."""

import os

import pytest

from lmtrain import distributed
from lmtrain.aot.topology import quiet_libtpu
from lmtrain.config import base_config


@pytest.fixture
def env(monkeypatch):
    """A private copy of the environment, cleared of every cluster hint."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in distributed._ENV_HINTS and not k.startswith("TPU_")
    }
    monkeypatch.setattr(os, "environ", environ)
    return environ


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(distributed, "_initialized", False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_single_host_tpu_hostnames_are_not_a_cluster(env, calls):
    env["TPU_WORKER_HOSTNAMES"] = "localhost"
    assert distributed.cluster_env_hint() is None
    distributed.maybe_initialize(base_config().distributed)
    assert calls == []


def test_libtpu_setup_for_compiles_does_not_make_training_distributed(env, calls):
    # lmtrain compile sets libtpu's variables in the process; a later train() in that process,
    # or a child process inheriting them, must still run single-process.
    quiet_libtpu("v5e:2x2")
    assert env["TPU_WORKER_HOSTNAMES"] == "localhost"
    distributed.maybe_initialize(base_config().distributed)
    assert calls == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("TPU_WORKER_HOSTNAMES", "host-0,host-1"),
        ("SLURM_JOB_ID", "42"),
        ("JAX_COORDINATOR_ADDRESS", "node0:1234"),
    ],
)
def test_multi_process_env_starts_jax_distributed(env, calls, key, value):
    env[key] = value
    assert distributed.cluster_env_hint() == key
    distributed.maybe_initialize(base_config().distributed)
    assert len(calls) == 1
    if key == "JAX_COORDINATOR_ADDRESS":
        assert calls[0]["coordinator_address"] == "node0:1234"
