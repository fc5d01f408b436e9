"""Online RL through the loop: rollouts on a (2,2,2) mesh, exact resume, LoRA trains adapters only."""

import json
import random

import jax
import numpy as np
import pytest

from lmtrain.config import base_config
from lmtrain.model import lora
from lmtrain.train import finetune
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.loop import build, train
from lmtrain.train.losses.rl import VALUE_KEY
from lmtrain.train.rollout import RolloutSource
from tests.support.finetune_fixtures import TOK


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    TOK.save(str(d / "tok"))
    rng = random.Random(0)
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(24):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=?", "response": str(a + b)}) + "\n")
    return d


def rl_cfg(files, objective="grpo", **rl):
    c = base_config()
    c.objective = objective
    c.model.update(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, dtype="float32"
    )
    c.data.update(train_file=str(files / "prompts.jsonl"), tokenizer=str(files / "tok"), seq_len=20)
    # completions that start with a digit score 1: a random model gets a mix within groups
    c.rl.update(group_size=4, max_new_tokens=6, rewards=("format",), format_regex="[0-9].*")
    c.rl.update(**rl)
    c.train.update(
        steps=2,
        global_batch_size=8,
        log_every=1,
        eval_every=10**6,
        checkpoint_every=10**6,
        samples=0,
        async_checkpoint=False,
    )
    c.optim.update(lr=3e-3, warmup_steps=1, decay_steps=5)
    c.fault.preflight = False
    return c


def quiet(*_):
    pass


def test_rollout_on_mesh_222_equals_one_device(files, tmp_path):
    batches = []
    for name, shape, n in (("one", (1, 1, 1), 1), ("mesh", (2, 2, 2), 8)):
        cfg = rl_cfg(files, num_iterations=2, beta=0.1)
        cfg.mesh.shape, cfg.mesh.num_devices = shape, n
        setup = build(cfg, str(tmp_path / name))
        params, _ = finetune.initial_params(setup)
        src = RolloutSource(setup, {"reference": params}, None, str(tmp_path / name), quiet)
        src.params = params
        batches.append(next(src))
        assert src.metrics()["rollout/length_capped"] <= 1.0
    one, mesh = batches
    for k in ("inputs", "targets", "loss_mask", "segment_ids"):
        np.testing.assert_array_equal(one[k], mesh[k])
    assert one["loss_mask"].sum() > 0
    np.testing.assert_array_equal(one["advantages"], mesh["advantages"])
    assert np.abs(one["advantages"]).sum() > 0
    for k in ("old_logps", "ref_logps"):
        np.testing.assert_allclose(one[k], mesh[k], rtol=1e-5, atol=1e-5)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_stop_and_resume_mid_rl_equals_uninterrupted_bitwise(files, tmp_path):
    # two iterations per rollout: the save after step 3 falls inside rollout 2's reuse
    def cfg(steps):
        c = rl_cfg(files, num_iterations=2, beta=0.05)
        c.train.update(steps=steps, checkpoint_every=3)
        return c

    full = train(cfg(5), str(tmp_path / "full"), print_fn=quiet)
    train(cfg(3), str(tmp_path / "split"), print_fn=quiet)
    ckpt = Checkpointer(str(tmp_path / "split" / "checkpoints"))
    _, it_state = ckpt.restore(3, *_abstract(cfg(5), tmp_path / "split"))
    ckpt.close()
    assert it_state["rollout"] == 2 and it_state["uses"] == 1 and "batch" in it_state
    resumed = train(cfg(5), str(tmp_path / "split"), print_fn=quiet)
    assert int(resumed["state"].step) == 5
    for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert resumed["train/loss"] == full["train/loss"]
    assert resumed["train/rollout/reward"] == full["train/rollout/reward"]
    # the prompt file's fitting is logged at the start like SFT/DPO records (all 24 fit whole)
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert first["step"] == 0 and first["data/train/examples"] == 24
    assert first["data/train/kept"] == 24 and first["data/train/prompt_cut"] == 0


def _abstract(cfg, workdir):
    setup = build(cfg, str(workdir))
    return setup.abstract_state, setup.shardings


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_lora_trains_only_the_adapters(files, tmp_path, objective):
    cfg = rl_cfg(files, objective, beta=0.1)
    cfg.lora.update(rank=2, targets=("q", "v"))
    out = train(cfg, str(tmp_path / objective), print_fn=quiet)
    params = jax.device_get(out["state"].params)
    body = {k: v for k, v in params.items() if k != VALUE_KEY}
    assert (VALUE_KEY in params) == (objective == "ppo")
    # every trainable leaf is an adapter factor: the base weights are not in the state at all
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(body)]
    assert paths and all(p.endswith("['a']") or p.endswith("['b']") for p in paths)
    n = sum(np.size(x) for x in jax.tree.leaves(body))
    assert n == lora.trainable_count(finetune.ModelConfig.from_config(cfg.model), 2, ("q", "v"))
    # the adapters moved (b starts at zero)
    assert any(np.abs(v["b"]).sum() > 0 for v in _adapter_factors(body))
    assert np.isfinite(out["train/loss"]) and out["train/kl"] >= 0


def _adapter_factors(tree):
    if isinstance(tree, dict) and "a" in tree and "b" in tree:
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _adapter_factors(v)


def test_reward_model_judge_on_the_mesh_scores_like_the_reward_objective(files, tmp_path):
    from lmtrain.data.finetune_data import chat_template_for
    from lmtrain.data.sft import build_preference_example
    from lmtrain.model.config import ModelConfig
    from lmtrain.model.transformer import Transformer
    from lmtrain.train.losses.reward import pair_scores
    from lmtrain.train.objectives import LossContext
    from lmtrain.train.rewards import PromptRecord
    from lmtrain.train.rollout import RewardModelJudge

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+1=?", "chosen": str(a + 1), "rejected": str(a)}) + "\n"
            for a in range(16)
        )
    )
    rm = rl_cfg(files, "reward")
    rm.data.train_file = str(pairs)
    rm.train.steps = 1
    out = train(rm, str(tmp_path / "rm"), print_fn=quiet)
    cfg = rl_cfg(files, rewards=("reward_model",), reward_model=str(tmp_path / "rm"))
    cfg.mesh.shape = (2, 2, 2)
    setup = build(cfg, str(tmp_path / "policy"))
    template = chat_template_for(TOK)
    judge = RewardModelJudge(str(tmp_path / "rm"), setup, template)
    records = [PromptRecord((("user", f"{a}+1=?"),)) for a in range(5)]
    comps = ["1", "22", "x", "", "7"]
    got = judge(records, comps)
    rows = [
        build_preference_example(list(r.turns), c, "0", TOK, template, rm.data.seq_len)
        for r, c in zip(records, comps)
    ]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = Transformer(ModelConfig.from_config(rm.model))
    ctx = LossContext(model=model, config=rm, train=False)
    want, _ = pair_scores(jax.device_get(out["state"].params), batch, ctx)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)
    assert np.std(got) > 0
