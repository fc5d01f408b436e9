"""SFT, reward and distillation objectives against numpy references and a separable toy set."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain.data.formats import PreferencePair
from lmtrain.data.sft import pack_examples, tokenize_sft
from lmtrain.model.reward_head import HEAD_KEY, init_reward_head
from lmtrain.train.objectives import OBJECTIVES, LossContext
from tests.support.finetune_fixtures import (
    SEQ,
    TEMPLATE,
    TOK,
    config,
    init_params,
    preference_batch,
    sft_batch,
    tiny_model,
)

CONVS = [
    [("user", "2+3=?"), ("assistant", "5")],
    [("user", "rev abcd"), ("assistant", "dcba")],
    [("user", "sort 4213"), ("assistant", "1234")],
]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_nll(model, params, batch):
    logits = np.asarray(
        model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    )
    return -np.take_along_axis(log_softmax(logits), batch["targets"][..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def model_params():
    model = tiny_model()
    return model, init_params(model, 0)


def test_sft_loss_is_response_tokens_only(model_params):
    model, params = model_params
    batch = sft_batch(CONVS)
    ctx = LossContext(model, config("sft"))
    s, w, _ = OBJECTIVES["sft"](params, batch, None, ctx)
    nll = numpy_nll(model, params, batch)
    mask = batch["loss_mask"]
    assert int(w) == mask.sum()
    np.testing.assert_allclose(float(s), (nll * mask).sum(), rtol=1e-5)
    # Every row's trained targets end with EOS; padding targets are pad (!= EOS) and untrained.
    for t, m in zip(batch["targets"], mask):
        assert t[m == 1][-1] == TOK.eos_id and TOK.pad_id != TOK.eos_id
        assert np.all(m[t == TOK.pad_id] == 0)
    # Changing prompt *targets* changes no loss term (they are masked out)...
    other = dict(
        batch,
        targets=np.where(mask == 1, batch["targets"], (batch["targets"] + 7) % TOK.vocab_size),
    )
    assert float(OBJECTIVES["sft"](params, other, None, ctx)[0]) == float(s)
    # ...while prompt *inputs* still matter through context.
    first_prompt = np.argmax(batch["inputs"][0] == TOK.encode("2")[0])
    ctx_changed = dict(batch, inputs=batch["inputs"].copy())
    ctx_changed["inputs"][0, first_prompt] = TOK.encode("7")[0]
    assert float(OBJECTIVES["sft"](params, ctx_changed, None, ctx)[0]) != float(s)


def test_sft_sequence_average_on_packed_rows(model_params):
    model, params = model_params
    examples = [tokenize_sft(c, TOK, TEMPLATE) for c in CONVS * 2]
    rows, stats = pack_examples(examples, SEQ * 2, pad_id=TOK.pad_id)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert batch["segment_ids"].max() >= 2  # really packed
    model = tiny_model()
    s, w, _ = OBJECTIVES["sft"](params, batch, None, LossContext(model, config_seq()))
    nll = numpy_nll(model, params, batch)
    means = []
    for r in range(len(rows)):
        for seg in range(1, batch["segment_ids"][r].max() + 1):
            m = (batch["segment_ids"][r] == seg) * batch["loss_mask"][r]
            means.append((nll[r] * m).sum() / m.sum())
    assert int(w) == len(means) == len(examples)
    np.testing.assert_allclose(float(s), np.sum(means), rtol=1e-5)


def config_seq():
    c = config("sft")
    c.sft.average = "sequence"
    c.model.max_seq_len = SEQ * 2
    return c


def test_distill_kl_with_temperature_mixed_with_lm(model_params):
    student_model, student = model_params
    teacher_model = tiny_model(d_model=48)
    teacher = init_params(teacher_model, 5)
    batch = sft_batch(CONVS)
    c = config("distill")
    c.distill.update(temperature=2.0, alpha=0.3)
    ctx = LossContext(
        student_model, c, frozen={"teacher": teacher}, extras={"teacher_model": teacher_model}
    )
    s, w, m = OBJECTIVES["distill"](student, batch, None, ctx)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    t = log_softmax(np.asarray(teacher_model.apply({"params": teacher}, *args)) / 2.0)
    st = log_softmax(np.asarray(student_model.apply({"params": student}, *args)) / 2.0)
    kl = (np.exp(t) * (t - st)).sum(-1)
    nll = numpy_nll(student_model, student, batch)
    mask = batch["loss_mask"]
    want = 0.3 * 4.0 * (kl * mask).sum() + 0.7 * (nll * mask).sum()
    np.testing.assert_allclose(float(s), want, rtol=1e-4)
    np.testing.assert_allclose(float(m["kl"][0]), (kl * mask).sum(), rtol=1e-4)
    assert float(w) == mask.sum()
    # The KL is zero against itself: only the LM part remains.
    self_ctx = LossContext(student_model, c, frozen={"teacher": student})
    s2, _, m2 = OBJECTIVES["distill"](student, batch, None, self_ctx)
    assert abs(float(m2["kl"][0])) < 1e-4
    np.testing.assert_allclose(float(s2), 0.7 * (nll * mask).sum(), rtol=1e-4)


def toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Separable: chosen answers use letters a-d, rejected ones w-z (random prompts and lengths)."""
    rng = random.Random(seed)

    def word(letters):
        return "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))

    return [
        PreferencePair([("user", f"say {word('abcdefghwxyz')}")], word("abcd"), word("wxyz"))
        for _ in range(n)
    ]


def test_reward_model_separates_a_toy_set():
    model = tiny_model()
    params = dict(init_params(model, 1))
    params[HEAD_KEY] = init_reward_head(32, jax.random.PRNGKey(3))
    train, held_out = preference_batch(toy_pairs(64, 0)), preference_batch(toy_pairs(64, 1))
    ctx = LossContext(model, config("reward"))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        (s, (w, m)), g = jax.value_and_grad(lambda q: _mean(q, train, ctx), has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, s

    first = None
    for _ in range(80):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    s, w, m = OBJECTIVES["reward"](params, held_out, None, ctx)
    acc = float(m["accuracy"][0] / w)
    assert first == pytest.approx(np.log(2), abs=0.3)
    assert acc > 0.95, acc
    assert float(m["margin"][0] / w) > 0


def _mean(p, batch, ctx):
    s, w, m = OBJECTIVES["reward"](p, batch, None, ctx)
    return s / w, (w, m)


def test_reward_scores_read_the_last_real_token(model_params):
    model, params = model_params
    params = dict(params, **{HEAD_KEY: init_reward_head(32, jax.random.PRNGKey(0))})
    batch = preference_batch()
    ctx = LossContext(model, config("reward"))
    base = OBJECTIVES["reward"](params, batch, None, ctx)
    # Padding after the last real token (segment 0) cannot change any score.
    changed = {k: v.copy() for k, v in batch.items()}
    pad = changed["chosen_segment_ids"] == 0
    changed["chosen_inputs"][pad] = 5
    np.testing.assert_allclose(
        OBJECTIVES["reward"](params, changed, None, ctx)[0], base[0], rtol=1e-6
    )
    assert jnp.isfinite(base[0])
