"""Two processes x four CPU devices (jax.distributed on localhost, gloo collectives) train to the
same losses as one process x eight devices, step for step: on a (data 2, fsdp 2, tensor 2) mesh,
and on (8, 1, 1) with the flat gradient all-reduce and several steps per call."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end-to-end: trains, resumes or runs processes

WORKER = textwrap.dedent(
    """
    import json, os, sys
    pid, nproc, ndev, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    import jax
    import numpy as np
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
    jax.config.update("jax_threefry_partitionable", True)
    from lmtrain.config import base_config
    from lmtrain.model.config import ModelConfig
    from lmtrain.model.sharding import batch_sharding, make_mesh
    from lmtrain.model.transformer import Transformer
    from lmtrain.train.optim import make_optimizer
    from lmtrain.train.state import init_state
    from lmtrain.train.step import make_train_step, stacked_shardings

    c = base_config()
    c.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=16, dtype="float32")
    c.train.update(steps=6, global_batch_size=8)
    c.optim.update(lr=1e-2, warmup_steps=1)
    assert jax.device_count() == 8 and jax.local_device_count() == ndev
    def batches(rng):
        for _ in range(c.train.steps):
            # Counting sequences from random starts: learnable, so the loss must fall.
            tokens = ((rng.integers(0, 64, (8, 1)) + np.arange(17)) % 64).astype(np.int32)
            seg = np.where(np.arange(16) < 10, 1, 2).astype(np.int32) * np.ones((8, 1), np.int32)
            pos = np.where(np.arange(16) < 10, np.arange(16), np.arange(16) - 10).astype(np.int32)
            yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                   "loss_mask": (seg == np.roll(seg, -1, 1)).astype(np.int32) | (np.arange(16) == 15),
                   "positions": np.broadcast_to(pos, (8, 16)).copy()}

    def global_array(v, sharding):
        return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

    def train(shape, group):
        mesh = make_mesh(shape)
        model = Transformer(ModelConfig.from_config(c.model))
        tx, schedule = make_optimizer(c.optim, c.train.steps)
        state, shardings = init_state(model, tx, 16, 0, mesh)
        bs = batch_sharding(mesh)
        step = make_train_step(model, schedule, c, mesh, shardings, bs)
        hosts, losses = list(batches(np.random.default_rng(0))), []
        for i in range(0, c.train.steps, group):
            if group == 1:
                state, m = step(state, {k: global_array(v, bs) for k, v in hosts[i].items()})
                losses.append(float(m["loss"]))
            else:
                stacked = {k: np.stack([h[k] for h in hosts[i : i + group]]) for k in hosts[i]}
                sk = stacked_shardings(bs)
                state, m = step.multi(state, {k: global_array(v, sk) for k, v in stacked.items()})
                losses.extend(float(x) for x in np.asarray(m["loss"]))
        return losses

    losses = train((2, 2, 2), 1)
    c.train.grad_sync = "flat"
    flat_losses = train((8, 1, 1), 3)
    if pid == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "flat": flat_losses, "processes": jax.process_count()}, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path, nproc: int, ndev: int) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"out_{nproc}.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(nproc), str(ndev), port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(nproc)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


def test_two_processes_match_one_process(tmp_path):
    single = _launch(tmp_path, nproc=1, ndev=8)
    multi = _launch(tmp_path, nproc=2, ndev=4)
    assert single["processes"] == 1 and multi["processes"] == 2
    for key in ("losses", "flat"):
        a, b = np.asarray(single[key]), np.asarray(multi[key])
        assert len(a) == 6 and a[-1] < a[0] - 0.5, key  # it trains
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)
    # the (8, 1, 1) flat run trains the same model on the same batches as the (2, 2, 2) one
    np.testing.assert_allclose(single["flat"], single["losses"], rtol=1e-4)
