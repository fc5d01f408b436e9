"""The persistent compilation cache: entries written to the configured directory and loaded back
after the in-memory caches are cleared; an unusable directory warns and leaves the run alone."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.train import compile_cache


@pytest.fixture
def restore_cache_settings():
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_compilation_cache_max_size,
    )
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.config.update("jax_compilation_cache_max_size", before[2])
    jax.config.update("jax_compilation_cache_dir", before[0])
    compile_cache.cc.reset_cache()


def test_second_compile_is_loaded_from_the_directory(tmp_path, restore_cache_settings):
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None
    )
    path = compile_cache.enable(str(tmp_path / "xla"))
    assert path == str(tmp_path / "xla")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache this small one

    def f(x):
        for _ in range(20):
            x = jnp.tanh(x @ x.T) * 0.5
        return x.sum()

    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), jnp.float32)
    first = float(jax.jit(f)(x))
    entries = [n for n in os.listdir(path) if n.endswith("-cache")]
    assert entries, "nothing written to the cache directory"
    jax.clear_caches()  # in-memory caches gone: the next compile must come from disk
    assert float(jax.jit(f)(x)) == first
    assert hits, "the second compile did not hit the persistent cache"


def test_empty_path_is_off_and_unwritable_path_warns(tmp_path, restore_cache_settings):
    assert compile_cache.enable("") is None
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="compilation_cache_dir"):
        assert compile_cache.enable(str(blocker / "xla")) is None
    assert blocker.read_text() == "not a directory"  # nothing touched
