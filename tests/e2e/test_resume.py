"""Exact resume: stop after k steps and restart = uninterrupted; checkpoints move across meshes."""

import shutil

import jax
import numpy as np
import pytest

from lmtrain.config import apply_overrides
from lmtrain.data import pipeline
from lmtrain.train.loop import train

pytestmark = pytest.mark.slow  # end-to-end: trains, resumes or runs processes


def run(cfg, workdir, **overrides):
    cfg = cfg.copy_and_resolve_references()
    apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    return train(cfg, str(workdir), print_fn=lambda *a: None)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_stop_and_restart_equals_uninterrupted_run_bitwise(tiny_cfg, tmp_path):
    full = run(tiny_cfg, tmp_path / "full", **{"train.steps": 8})
    run(tiny_cfg, tmp_path / "split", **{"train.steps": 4})
    resumed = run(tiny_cfg, tmp_path / "split", **{"train.steps": 8})
    assert int(resumed["state"].step) == 8
    for a, b in zip(leaves(full["state"]), leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert resumed["train/loss"] == full["train/loss"]


def test_iterator_state_resumes_the_same_next_batches(tiny_cfg, tmp_path):
    run(tiny_cfg, tmp_path / "w", **{"train.steps": 1})  # writes the char-level shards
    split = str(tmp_path / "w" / "data" / "train")
    ds = pipeline.train_dataset(split, seq_len=32, batch_size=4, seed=3)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iter(pipeline.train_dataset(split, seq_len=32, batch_size=4, seed=3))
    it2.set_state(state)
    for w in want:
        g = next(it2)
        for k in pipeline.EXAMPLE_KEYS:
            np.testing.assert_array_equal(g[k], w[k])


def test_checkpoint_from_8_devices_continues_on_2x2x2_and_on_one_device(tiny_cfg, tmp_path):
    run(tiny_cfg, tmp_path / "a", **{"train.steps": 4, "mesh.shape": "(8,1,1)"})
    for name in ("b", "c"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
    ref = run(tiny_cfg, tmp_path / "a", **{"train.steps": 8, "mesh.shape": "(8,1,1)"})
    on_222 = run(tiny_cfg, tmp_path / "b", **{"train.steps": 8, "mesh.shape": "(2,2,2)"})
    on_one = run(
        tiny_cfg,
        tmp_path / "c",
        **{"train.steps": 8, "mesh.shape": "(1,1,1)", "mesh.num_devices": 1},
    )
    for other in (on_222, on_one):
        assert int(other["state"].step) == 8
        np.testing.assert_allclose(other["train/loss"], ref["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(other["eval/loss"], ref["eval/loss"], rtol=1e-5)
        for a, b in zip(leaves(ref["state"]), leaves(other["state"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert len(on_one["state"].params["embedding"].sharding.device_set) == 1


def test_logged_train_loss_avg_is_the_mean_over_the_log_interval(tiny_cfg, tmp_path):
    import json

    def logged(workdir):
        rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
        return {r["step"]: r for r in rows if "train/loss" in r}

    run(tiny_cfg, tmp_path / "every", **{"train.steps": 8, "train.log_every": 1})
    run(tiny_cfg, tmp_path / "four", **{"train.steps": 8, "train.log_every": 4})
    each, four = logged(tmp_path / "every"), logged(tmp_path / "four")
    assert sorted(four) == [4, 8]
    for end in (4, 8):
        want = np.mean([each[s]["train/loss"] for s in range(end - 3, end + 1)])
        np.testing.assert_allclose(four[end]["train/loss_avg"], want, rtol=1e-6)
        assert four[end]["train/loss"] == each[end]["train/loss"]  # the last step's loss


def test_several_steps_per_dispatch_give_the_same_run_and_checkpoints(tiny_cfg, tmp_path):
    """train.steps_per_dispatch groups steps into one call; logs, evals and checkpoints still
    land on their steps (log_every=3 is not a multiple of 2: those steps run one per call)."""
    import json

    def logged(workdir):
        rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
        return {r["step"]: r for r in rows if "train/loss" in r}

    common = {"train.steps": 8, "train.log_every": 3, "train.eval_every": 4}
    one = run(tiny_cfg, tmp_path / "one", **common)
    grouped = run(tiny_cfg, tmp_path / "two", **common, **{"train.steps_per_dispatch": 2})
    a, b = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert sorted(a) == sorted(b) == [3, 6, 8]
    for s in a:
        for k in ("train/loss", "train/loss_avg", "train/grad_norm", "train/lr"):
            np.testing.assert_allclose(b[s][k], a[s][k], rtol=1e-6, err_msg=f"step {s} {k}")
    np.testing.assert_allclose(grouped["eval/loss"], one["eval/loss"], rtol=1e-6)
    for x, y in zip(leaves(one["state"]), leaves(grouped["state"])):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
    saved = lambda w: sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit())  # noqa: E731
    assert saved(tmp_path / "one") == saved(tmp_path / "two") == ["4", "8"]
    # and a grouped run resumes exactly
    run(tiny_cfg, tmp_path / "split", **{**common, "train.steps": 4, "train.steps_per_dispatch": 2})
    resumed = run(tiny_cfg, tmp_path / "split", **common, **{"train.steps_per_dispatch": 2})
    for x, y in zip(leaves(grouped["state"]), leaves(resumed["state"])):
        np.testing.assert_array_equal(y, x)


def test_dispatch_size_never_straddles_a_log_eval_or_checkpoint_step(tiny_cfg):
    from lmtrain.train.loop import dispatch_size

    cfg = tiny_cfg.copy_and_resolve_references()
    apply_overrides(
        cfg,
        [
            "train.steps=100",
            "train.log_every=10",
            "train.eval_every=20",
            "train.checkpoint_every=50",
        ],
    )
    assert dispatch_size(0, 5, cfg) == 5  # steps 1..5
    assert dispatch_size(5, 5, cfg) == 5  # ends on the log step 10
    assert dispatch_size(7, 5, cfg) == 1  # 8..12 would pass the log step 10
    assert dispatch_size(96, 5, cfg) == 1  # 97..101 would run past the end
    assert dispatch_size(0, 1, cfg) == 1
    apply_overrides(cfg, ["data.curriculum_start_len=8", "data.curriculum_steps=40"])
    lengths = [pipeline.curriculum_seq_len(s, 8, 40, cfg.data.seq_len) for s in range(100)]
    for s in range(0, 95, 5):
        if dispatch_size(s, 5, cfg) == 5:
            assert len(set(lengths[s : s + 5])) == 1
    assert dispatch_size(5, 5, cfg) == 5 and dispatch_size(10, 5, cfg) == 1  # length 8 → 16 at 13
