"""SFT, LoRA and DPO through the one train loop on the 8-device mesh, starting from init_from."""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import jax
import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.data import finetune_data
from lmtrain.data.tokenizer import CharTokenizer
from lmtrain.errors import ConfigError
from lmtrain.infer.loader import load_run
from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.model import lora
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import make_mesh
from lmtrain.model.transformer import Transformer
from lmtrain.train import lora_io
from lmtrain.train.divergence import REPORT_FILE, TrainingDiverged
from lmtrain.train.finetune import abstract_params, restore_run_params
from lmtrain.train.loop import build, train
from lmtrain.train.run_loader import load_workdir
from tests.support.finetune_fixtures import TOK

pytestmark = pytest.mark.slow  # end-to-end: trains, resumes or runs processes

MESH = (2, 2, 2)  # data x fsdp x tensor: every axis in use


def task(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"{a}+{b}=?", str(a + b)


def base_run_config(**kw):
    c = base_config()
    c.model.update(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, dtype="float32"
    )
    c.data.seq_len = 32
    c.train.update(
        steps=4,
        global_batch_size=8,
        log_every=1,
        eval_every=1000,
        eval_batches=2,
        checkpoint_every=1000,
        samples=0,
        async_checkpoint=False,
    )
    c.optim.update(lr=3e-3, warmup_steps=1, min_lr=1e-4)
    c.mesh.shape = MESH
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pre-trained tiny lm run (chat specials in its vocab) plus SFT and preference files."""
    root = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    docs = [" ".join(f"{q} {a}" for q, a in (task(rng) for _ in range(6))) for _ in range(300)]
    finetune_data.write_token_dataset(
        str(root / "data"), TOK, {"train": docs[:250], "validation": docs[250:]}
    )
    pre = base_run_config(objective="lm")
    pre.data.dir = str(root / "data")
    train(pre, str(root / "pre"), print_fn=lambda *_: None)
    sft, prefs = [], []
    for _ in range(40):
        q, a = task(rng)
        sft.append({"prompt": q, "response": a})
        prefs.append({"prompt": q, "chosen": a, "rejected": str(int(a) + 1)})
    for name, recs in (("sft", sft), ("prefs", prefs)):
        finetune_data.write_jsonl(str(root / f"{name}.jsonl"), recs)
    return root


def ft_config(files, objective: str, data: str, **kw):
    c = base_run_config(objective=objective, init_from=str(files / "pre"))
    c.model.update(d_model=64)  # replaced by the init_from run's architecture
    c.data.update(train_file=str(files / f"{data}.jsonl"), eval_file=str(files / f"{data}.jsonl"))
    c.train.update(steps=3, eval_every=3)
    c.update(kw)
    return c


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def init_params(files):
    """(model, params) of the pre-trained run, restored independently of the loop."""
    run_cfg = json.loads((files / "pre" / "config.json").read_text())
    model = Transformer(ModelConfig.from_config(run_cfg["model"]))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    abstract, shardings = abstract_params(model, 32, mesh)
    with mesh:
        params = restore_run_params(str(files / "pre"), abstract, shardings)
    return model, jax.device_get(params)


def test_sft_runs_on_the_8_device_mesh_from_init_from(files, tmp_path):
    cfg = ft_config(files, "sft", "sft")
    out = train(cfg, str(tmp_path), print_fn=lambda *_: None)
    assert cfg.model.d_model == 32  # architecture taken from init_from
    assert dict(out["state"].params["layers_0"]["attn"]["q_kernel"].sharding.mesh.shape) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged if "train/loss" in m] == [1, 2, 3]
    assert all(math.isfinite(m["train/loss"]) for m in logged if "train/loss" in m)
    assert out["eval/weight"] > 0 and math.isfinite(out["eval/perplexity"])
    # Started from the pre-trained params: 3 small Adam steps away from them, unlike a fresh init.
    _, pre = init_params(files)
    final = jax.device_get(out["state"].params)
    moved = np.abs(final["embedding"] - pre["embedding"]).max()
    assert 0 < moved < 0.05 < np.abs(pre["embedding"]).mean()


def test_lora_trains_only_adapters_and_merges(files, tmp_path):
    cfg = ft_config(files, "sft", "sft")
    cfg.lora.update(rank=4, alpha=8.0, targets=("q", "v", "down"), dropout=0.1)
    out = train(cfg, str(tmp_path), print_fn=lambda *_: None)
    state = out["state"]
    model, base = init_params(files)
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_adapter == lora.trainable_count(model.cfg, 4, ("q", "v", "down"))
    # Optimizer state exists for the adapters only (Adam: two moments of each adapter leaf).
    opt_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_sizes == 2 * n_adapter
    b = np.asarray(state.params["layers_1"]["mlp"]["down_kernel"]["b"])
    assert np.abs(b).max() > 0  # b moved away from zero init
    # The adapter files hold the final adapters; base + adapters merge to the trained model.
    adapters, meta = lora_io.load_adapters(str(tmp_path / "adapters"))
    jax.tree.map(np.testing.assert_array_equal, adapters, jax.device_get(state.params))
    assert meta["step"] == 3 and meta["init_from"] == str(files / "pre")
    combined = lora_io.load_lora_run(str(tmp_path))
    merged = lora.merge(combined)
    tokens = np.asarray([TOK.encode("12+30=?42")])
    want = model.apply({"params": lora.apply_adapters(base, adapters, 8.0 / 4)}, tokens)
    np.testing.assert_allclose(model.apply({"params": merged}, tokens), want, rtol=1e-5, atol=1e-5)
    base_logits = model.apply({"params": base}, tokens)
    assert np.abs(np.asarray(want) - np.asarray(base_logits)).max() > 1e-4


def test_dpo_runs_on_the_8_device_mesh_and_starts_at_ln2(files, tmp_path):
    cfg = ft_config(files, "dpo", "prefs")
    cfg.dpo.beta = 0.5
    out = train(cfg, str(tmp_path), print_fn=lambda *_: None)
    logged = [m for m in metrics(tmp_path) if "train/loss" in m]
    assert logged[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert (
        abs(logged[0]["train/rewards/chosen"]) < 1e-5
        and abs(logged[0]["train/rewards/rejected"]) < 1e-5
    )
    assert logged[-1]["train/rewards/margin"] != 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"):
        assert f"train/{key}" in logged[-1] and f"eval/{key}" in out
    assert out["eval/weight"] == 40


def test_dpo_with_lora_and_precomputed_reference(files, tmp_path):
    cfg = ft_config(files, "dpo", "prefs")
    cfg.lora.update(rank=2, targets=("q", "v"))
    cfg.dpo.reference = "precomputed"
    cfg.train.steps = 2
    train(cfg, str(tmp_path), print_fn=lambda *_: None)
    logged = [m for m in metrics(tmp_path) if "train/loss" in m]
    assert logged[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("reference", ["params", "precomputed"])
def test_dpo_lora_with_flat_grads_and_grouped_steps_matches_spmd_per_step(
    files, tmp_path, reference
):
    """On a pure data-parallel mesh the flat all-reduce (shard_map) gets the frozen trees (LoRA
    base, DPO reference) as replicated inputs, and 2 steps per call run them through the scan:
    the same run as XLA's SPMD reduction one step per call."""
    runs = {}
    for name, extra in {
        "spmd": {"grad_sync": "spmd", "steps_per_dispatch": 1},
        "flat": {"grad_sync": "flat", "steps_per_dispatch": 2},
    }.items():
        cfg = ft_config(files, "dpo", "prefs")
        cfg.mesh.shape = (8, 1, 1)
        cfg.lora.update(rank=2, targets=("q", "v"))
        cfg.dpo.reference = reference
        cfg.train.update(steps=4, log_every=2, eval_every=4, **extra)
        out = train(cfg, str(tmp_path / name), print_fn=lambda *_: None)
        runs[name] = (out, {m["step"]: m for m in metrics(tmp_path / name) if "train/loss" in m})
    (a, la), (b, lb) = runs["spmd"], runs["flat"]
    assert sorted(la) == sorted(lb) == [2, 4]
    for s in (2, 4):
        for k in ("train/loss", "train/loss_avg", "train/rewards/margin", "train/grad_norm"):
            np.testing.assert_allclose(lb[s][k], la[s][k], rtol=1e-5, atol=1e-7, err_msg=f"{s} {k}")
    np.testing.assert_allclose(b["eval/loss"], a["eval/loss"], rtol=1e-5)
    assert la[4]["train/rewards/margin"] != 0.0  # the adapters moved


def test_init_from_refuses_a_different_tokenizer(files, tmp_path):
    other = CharTokenizer.train(["abc+=?0123456789\n"])
    other.save(tmp_path / "tok")
    cfg = ft_config(files, "sft", "sft")
    cfg.data.tokenizer = str(tmp_path / "tok")
    with pytest.raises(ConfigError, match="different tokenizer"):
        build(cfg, str(tmp_path / "run"))


def test_init_from_refuses_a_different_vocab_size(files, tmp_path):
    run = tmp_path / "fake"
    run.mkdir()
    cfg_json = json.loads((files / "pre" / "config.json").read_text())
    cfg_json["model"]["vocab_size"] = TOK.vocab_size - 3
    (run / "config.json").write_text(json.dumps(cfg_json))
    (run / "run_manifest.json").write_text((files / "pre" / "run_manifest.json").read_text())
    cfg = ft_config(files, "sft", "sft", init_from=str(run))
    with pytest.raises(ConfigError, match=f"vocab_size {TOK.vocab_size - 3} but the tokenizer has"):
        build(cfg, str(tmp_path / "run"))
    cfg = ft_config(files, "sft", "sft")
    cfg.model.vocab_size = TOK.vocab_size + 5
    with pytest.raises(ConfigError, match=f"but config.model.vocab_size has {TOK.vocab_size + 5}"):
        build(cfg, str(tmp_path / "run"))


def test_records_runs_need_a_tokenizer_source(files, tmp_path):
    cfg = ft_config(files, "sft", "sft", init_from="")
    with pytest.raises(ConfigError, match="need a tokenizer"):
        build(cfg, str(tmp_path))
    cfg = ft_config(files, "dpo", "prefs")
    cfg.data.update(train_file="", dir=str(files / "data"))
    with pytest.raises(ConfigError, match="objective='dpo' needs config.data.train_file"):
        build(cfg, str(tmp_path))


PROMPTS = [TOK.encode("12+30=?"), TOK.encode("7+8=?"), TOK.encode("40+1=?")]


def greedy(model, params) -> list[list[int]]:
    sp = SamplingParams(max_new_tokens=6, eos_id=TOK.eos_id, temperature=0.0)
    return generate(model, params, PROMPTS, sp, pad_id=TOK.pad_id).tokens


def test_load_run_of_a_lora_run_gives_merged_params_that_generate(files, tmp_path):
    """`lmtrain generate/eval` go through load_run; a LoRA checkpoint holds only adapters."""
    cfg = ft_config(files, "sft", "sft")
    cfg.train.update(steps=2, eval_every=1000)
    cfg.lora.update(rank=4, alpha=8.0, targets=("q", "v", "down"))
    train(cfg, str(tmp_path), print_fn=lambda *_: None)
    run = load_run(str(tmp_path))
    assert dict(run.setup.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # Independent path: the adapter files + the init_from base, merged by lora.merge.
    merged = lora.merge(lora_io.load_lora_run(str(tmp_path)))
    got = jax.device_get(run.params)
    assert jax.tree.structure(got) == jax.tree.structure(merged)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, merged)
    _, base = init_params(files)
    assert not np.array_equal(
        got["layers_0"]["attn"]["q_kernel"], base["layers_0"]["attn"]["q_kernel"]
    )
    assert greedy(run.setup.model, run.params) == greedy(run.setup.model, merged)
    # serve and the exports read the same run through the same loader and merge
    served = load_workdir(str(tmp_path))
    assert served.has_adapters and "embedding" not in served.params
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        served.plain_params(),
        merged,
    )


def test_init_from_a_lora_run_starts_from_its_merged_params(files, tmp_path):
    """Chaining stages (LoRA SFT -> DPO/SFT): a LoRA checkpoint holds adapters only."""
    from lmtrain.train import finetune

    cfg = ft_config(files, "sft", "sft")
    cfg.train.update(steps=2, eval_every=1000)
    cfg.lora.update(rank=4, alpha=8.0, targets=("q", "v", "down"))
    train(cfg, str(tmp_path / "lora"), print_fn=lambda *_: None)
    merged = lora.merge(lora_io.load_lora_run(str(tmp_path / "lora")))  # independent path

    nxt = ft_config(files, "sft", "sft", init_from=str(tmp_path / "lora"))
    nxt.train.update(steps=1, eval_every=1000)
    setup = build(nxt, str(tmp_path / "next"))
    start, _ = finetune.initial_params(setup)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        jax.device_get(start),
        merged,
    )


def test_load_run_of_an_init_from_run_needs_no_init_from_run(files, tmp_path):
    """A full fine-tune's checkpoint is self-contained: the base run may be gone."""
    shutil.copytree(files / "pre", tmp_path / "pre")
    cfg = ft_config(files, "sft", "sft", init_from=str(tmp_path / "pre"))
    cfg.train.update(steps=2, eval_every=1000)
    out = train(cfg, str(tmp_path / "sft"), print_fn=lambda *_: None)
    trained = jax.device_get(out["state"].params)
    shutil.rmtree(tmp_path / "pre")
    run = load_run(str(tmp_path / "sft"))
    assert run.setup.tokenizer.fingerprint() == TOK.fingerprint()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), trained)
    assert greedy(run.setup.model, run.params) == greedy(run.setup.model, trained)


@pytest.mark.parametrize(
    "group,bad,last_good",
    [(1, (1, 2), 1), (2, (3, 4), 2)],  # 2 steps per call: the streak ends inside a later call
)
def test_nan_streak_in_an_sft_run_names_the_offending_rows(
    files, tmp_path, monkeypatch, group, bad, last_good
):
    original = finetune_data.train_dataset

    def poisoned(*args, **kwargs):
        def poison(index, batch):
            batch = dict(batch, loss_mask=batch["loss_mask"].astype(np.float32))
            if index in bad:
                batch["loss_mask"][:] = np.nan
            return batch

        return original(*args, **kwargs).map_with_index(poison)

    monkeypatch.setattr(finetune_data, "train_dataset", poisoned)
    cfg = ft_config(files, "sft", "sft")
    cfg.train.update(
        steps=8,
        eval_every=1000,
        log_every=group,
        checkpoint_every=group,
        steps_per_dispatch=group,
        max_nonfinite_in_a_row=2,
    )
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row"):
        train(cfg, str(tmp_path), print_fn=lambda *_: None)
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["train_file"] == str(files / "sft.jsonl")
    assert report["last_good_checkpoint"] == last_good
    batches = report["offending_batches"]
    assert [b["batch_index"] for b in batches] == list(bad)
    assert report["stopped_at_step"] == bad[1] + 1  # steps count from 1, batches from 0
    # The named rows are exactly the rows of the offending batches.
    rows = finetune_data.rows_for_objective(cfg, TOK, str(files / "sft.jsonl"))
    ds = original(rows, batch_size=8, seed=cfg.seed)
    for b in batches:
        assert len(b["row_indices"]) == 8
        np.testing.assert_array_equal(
            rows["inputs"][b["row_indices"]], ds[b["batch_index"]]["inputs"]
        )


def test_records_run_without_an_eval_file_trains_and_skips_eval(files, tmp_path):
    cfg = ft_config(files, "sft", "sft")
    cfg.data.eval_file = ""
    cfg.train.update(steps=2, eval_every=1)
    out = train(cfg, str(tmp_path), print_fn=lambda *_: None)
    assert int(out["state"].step) == 2 and "eval/loss" not in out
    assert math.isfinite(out["train/loss"])
