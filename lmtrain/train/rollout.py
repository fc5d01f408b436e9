"""The rollout phase of online RL (objectives ``grpo`` / ``ppo``): prompts → samples → a train batch.

The loop reads batches from a :class:`RolloutSource` the way it reads any dataset iterator
(``next``, ``get_state``, ``close``); before each ``next`` it hands over the current params. Every
``config.rl.num_iterations`` steps the source

1. takes the next ``global_batch_size / group_size`` prompts (a shuffled, checkpointable Grain
   iterator over ``data.train_file``) and repeats each ``group_size`` times; prompts over the
   budget (``rl.max_prompt_len``) were cut or dropped at start by ``data.truncation`` like SFT/DPO
   rows (lmtrain/data/fit.py), counted in the console and ``data/{train,eval}/*`` metrics;
2. samples completions with the KV-cache sampler sharded over the training mesh (temperature,
   top-k/top-p, one stop string, ``max_new_tokens``), the seed derived from ``(seed, rollout
   index)`` so a resumed run samples the same;
3. scores them with the reward plug-ins (lmtrain/train/rewards.py);
4. lays out ``prompt + completion`` rows (``loss_mask`` on completion tokens up to and including
   EOS or the stop string; nothing after), and runs one forward pass each for what the loss needs:
   old log-probs (``num_iterations`` > 1), reference log-probs (``beta`` > 0: frozen initial params,
   or with LoRA the frozen base — adapters off, no second copy) and PPO's values;
5. computes advantages (GRPO: per group; PPO: GAE) and serves the batch ``num_iterations`` times.

The checkpointed iterator state holds the prompt iterator, the rollout index and, when a save
falls inside a reused batch, that batch itself (npz, base64), so a resumed run is bitwise the
uninterrupted one. ``evaluate`` samples held-out prompts (``data.eval_file``), reports their reward
and the per-sequence log-ratio to the reference, and writes ``rollouts/eval_<step>.jsonl``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.data import finetune_data, fit, pipeline
from lmtrain.data.formats import parse_preference_record, parse_sft_record, read_jsonl
from lmtrain.data.sft import build_preference_example
from lmtrain.errors import ConfigError, DataError
from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.model.config import ModelConfig
from lmtrain.model.reward_head import HEAD_KEY, reward_scores, split_head
from lmtrain.model.sharding import LOGICAL_RULES, data_shards
from lmtrain.model.transformer import Transformer
from lmtrain.rl_config import RL_OBJECTIVES
from lmtrain.train import advantages as adv_lib
from lmtrain.train import finetune
from lmtrain.train import rewards as rewards_lib
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.losses.rl import policy_forward, split_value_head
from lmtrain.train.objectives import LossContext, token_cross_entropy
from lmtrain.train.rewards import PromptRecord

LM_FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def is_rl(config) -> bool:
    return config.objective in RL_OBJECTIVES


# ---- prompts ---------------------------------------------------------------------------------


def parse_prompt_record(obj: dict, where: str, layout: str = "auto") -> PromptRecord:
    """A JSONL record → the prompt turns and the reference answer.

    Accepted: SFT records (prompt/response, messages, alpaca: the last assistant turn is the
    reference), preference pairs (prompt/chosen/rejected or hh-rlhf text: chosen is the
    reference) and prompt-only records (``{"prompt": ..., "answer": ...}``, answer optional).
    Other keys (e.g. ``test``, ``entry_point`` for the code reward) ride along in ``extra``.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    known = {"prompt", "response", "answer", "messages", "chosen", "rejected", "system"}
    known |= {"instruction", "input", "output"}
    extra = {k: v for k, v in obj.items() if k not in known}
    if "chosen" in obj:
        pair = parse_preference_record(obj, where)
        return PromptRecord(tuple(pair.prompt.turns), pair.chosen, extra, where)
    if "prompt" in obj and "response" not in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string")
        turns = (("system", obj["system"]),) if "system" in obj else ()
        ref = obj.get("answer", "")
        return PromptRecord((*turns, ("user", obj["prompt"])), str(ref), extra, where)
    conv = parse_sft_record(obj, where, layout)[0]
    turns = tuple(conv.turns)
    return PromptRecord(tuple(tuple(t) for t in turns[:-1]), turns[-1].content, extra, where)


def read_prompts(path: str, layout: str = "auto") -> list[PromptRecord]:
    if not os.path.isfile(path):
        raise DataError(
            f"RL prompt file {path!r} does not exist (config.data.train_file/eval_file)"
        )
    out = list(read_jsonl(path, lambda obj, where: [parse_prompt_record(obj, where, layout)]))
    if not out:
        raise DataError(f"{path}: no prompt records")
    return out


def encode_prompts(
    records, tokenizer, template, max_len: int, truncation: str = "keep_end", stats=None
):
    """(token ids, kept records): each prompt fitted to ``max_len`` tokens by the fine-tuning
    data policy (lmtrain/data/fit.py ``fit_prompt``: ``keep_end`` drops its oldest tokens,
    ``drop`` drops the prompt); every cut and drop is counted in ``stats`` (a ``FitStats``)."""
    ids, kept = [], []
    for r in records:
        x = template.encode_generation_prompt(list(r.turns), tokenizer)
        x, reason = fit.fit_prompt(x, max_len, truncation)
        if stats is not None:
            stats.add(reason)
        if x is not None:
            ids.append(x)
            kept.append(r)
    return ids, kept


def prompt_budget(config) -> int:
    """Prompt tokens a rollout row leaves room for: ``config.rl.max_prompt_len``, or when 0 all
    that the completion's ``max_new_tokens`` leave of ``seq_len + 1`` ids."""
    room = config.data.seq_len + 1 - config.rl.max_new_tokens
    return int(config.rl.get("max_prompt_len", 0)) or room


# ---- rows ------------------------------------------------------------------------------------


def completion_tokens(gen_tokens, reason: str, eos_id: int, stop_ids: Sequence[int]):
    """What the policy emitted and is trained on: the tokens plus EOS, or plus the stop string."""
    toks = list(gen_tokens)
    if reason == "eos":
        toks.append(eos_id)
    elif reason == "stop":
        toks += list(stop_ids)
    return toks


def build_rows(prompts, completions, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """LM-layout rows ``prompt + completion`` right-padded to ``seq_len``; ``loss_mask`` 1 on the
    completion's tokens as targets (nothing after its EOS / stop / length cap)."""
    B = len(prompts)
    out = {k: np.zeros((B, seq_len), np.int32) for k in LM_FIELDS}
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        if len(row) > seq_len + 1:
            raise DataError(
                f"prompt ({len(p)}) + completion ({len(c)}) tokens exceed config.data.seq_len + 1"
            )
        n = len(row) - 1
        out["inputs"][i, :n] = row[:-1]
        out["targets"][i, :n] = row[1:]
        out["inputs"][i, n:] = pad_id
        out["targets"][i, n:] = pad_id
        out["segment_ids"][i, :n] = 1
        out["positions"][i] = np.arange(seq_len)
        out["loss_mask"][i, len(p) - 1 : n] = 1
    return out


def _encode_state(batch: dict) -> str:
    buf = io.BytesIO()
    np.savez(buf, **batch)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_state(text: str) -> dict:
    with np.load(io.BytesIO(base64.b64decode(text))) as z:
        return {k: z[k] for k in z.files}


def _seed(seed: int, index: int, salt: int) -> int:
    """A sampling seed per (run seed, rollout index, stream): the sampling RNG's whole state."""
    return int(np.random.SeedSequence([seed, index, salt]).generate_state(1)[0] & 0x7FFFFFFF)


# ---- the reward model judge -----------------------------------------------------------------


class RewardModelJudge:
    """Scores prompt + completion with a trained ``reward`` run, batched on the training mesh."""

    def __init__(self, workdir: str, setup, template):
        run_cfg, _ = finetune.read_run(workdir)
        if run_cfg.get("objective") != "reward":
            raise ConfigError(
                f"config.rl.reward_model={workdir!r} is a {run_cfg.get('objective')!r} run; "
                "train one with objective=reward"
            )
        finetune.check_same_vocabulary(
            workdir, setup.tokenizer, setup.config.model.vocab_size, "config.rl.reward_model"
        )
        cfg = setup.config
        self.model = Transformer(
            ModelConfig.from_config({**run_cfg["model"], "dtype": cfg.model.dtype, "remat": "none"})
        )
        self.seq_len = int(run_cfg["data"]["seq_len"])
        abstract, shardings = finetune.abstract_params(self.model, self.seq_len, setup.mesh)
        d = self.model.cfg.d_model
        rep = NamedSharding(setup.mesh, PartitionSpec())
        abstract[HEAD_KEY] = {
            "kernel": jax.ShapeDtypeStruct((d,), jnp.float32),
            "bias": jax.ShapeDtypeStruct((), jnp.float32),
        }
        shardings[HEAD_KEY] = {"kernel": rep, "bias": rep}
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
        try:
            step = ckpt.latest_step()
            if step is None:
                raise ConfigError(f"config.rl.reward_model={workdir!r} has no checkpoint")
            with setup.mesh:
                self.params = ckpt.restore_params(step, abstract, shardings)
        finally:
            ckpt.close()
        self.setup, self.template, self.example = setup, template, build_preference_example

        def score(params, batch):
            backbone, head = split_head(params)
            hidden = self.model.apply(
                {"params": backbone},
                batch["inputs"],
                batch["positions"],
                batch["segment_ids"],
                return_hidden=True,
            )
            return reward_scores(head, hidden, batch["segment_ids"])

        self._score = jax.jit(score)

    def __call__(self, prompts, completions) -> np.ndarray:
        tok = self.setup.tokenizer
        rows = [
            self.example(list(p.turns), c, c, tok, self.template, self.seq_len)
            for p, c in zip(prompts, completions)
        ]
        batch = {k: np.stack([r[f"chosen_{k}"] for r in rows]) for k in LM_FIELDS}
        n = len(rows)
        pad = -n % data_shards(self.setup.mesh)
        if pad:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()}
        with self.setup.mesh, nn.logical_axis_rules(LOGICAL_RULES):
            out = self._score(self.params, jax.device_put(batch, self.setup.batch_sharding))
        return np.asarray(out, np.float32)[:n]


class _MeshRules:
    """``with mesh, nn.logical_axis_rules(...)``: the model's sharding constraints apply."""

    def __init__(self, mesh):
        self.mesh, self.rules = mesh, nn.logical_axis_rules(LOGICAL_RULES)

    def __enter__(self):
        self.mesh.__enter__()
        self.rules.__enter__()
        return self

    def __exit__(self, *exc):
        self.rules.__exit__(*exc)
        return self.mesh.__exit__(*exc)


# ---- forward passes over a rollout batch -----------------------------------------------------


def token_logps(model, params, batch) -> jax.Array:
    """(B, T) float32 log-probs of ``targets`` under plain model ``params``."""
    logits = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    nll, _ = token_cross_entropy(logits, batch["targets"])
    return -nll


class RolloutSource:
    """Rollout batches for the loop (see the module docstring); iterator-like and checkpointable."""

    def __init__(self, setup, frozen, iter_state: dict | None, workdir: str, print_fn=print):
        cfg = self.cfg = setup.config
        self.setup, self.frozen, self.workdir, self.print_fn = setup, frozen, workdir, print_fn
        self.tok = setup.tokenizer
        self.template = finetune_data.chat_template_for(self.tok, cfg.data.chat_markers)
        r = cfg.rl
        self.G, self.iters = r.group_size, r.num_iterations
        self.max_prompt = prompt_budget(cfg)
        self.stop_ids = self.tok.encode(r.stop) if r.stop else []
        self.fit_stats: dict[str, fit.FitStats] = {}
        records = read_prompts(cfg.data.train_file, cfg.data.format)
        self.ids, self.records = self._fit("train", cfg.data.train_file, records)
        if not self.records:
            raise DataError(
                f"{cfg.data.train_file}: every prompt is longer than {self.max_prompt} tokens "
                "(config.rl.max_prompt_len); raise config.data.seq_len or use "
                "config.data.truncation='keep_end'"
            )
        self.eval_ids, self.eval_records = [], []
        if cfg.data.eval_file:
            ev = read_prompts(cfg.data.eval_file, cfg.data.format)
            if r.eval_max_prompts:
                ev = ev[: r.eval_max_prompts]
            self.eval_ids, self.eval_records = self._fit("eval", cfg.data.eval_file, ev)
        self.rewards, self.weights = rewards_lib.make_rewards(
            cfg, lambda: RewardModelJudge(r.reward_model, setup, self.template)
        )
        per_process = cfg.train.global_batch_size // jax.process_count()
        import grain

        ds = grain.MapDataset.range(len(self.records))
        if jax.process_count() > 1:
            ds = ds[jax.process_index() :: jax.process_count()]
        if len(ds) < per_process // self.G:
            raise DataError(
                f"{cfg.data.train_file}: {len(ds)} prompts per process, fewer than the "
                f"{per_process // self.G} a rollout needs (global_batch_size / rl.group_size)"
            )
        ds = ds.shuffle(seed=cfg.seed).repeat(None).batch(per_process // self.G)
        self._it = pipeline.iterate(ds)
        self.index, self.uses, self.batch, self.encoded = 0, 0, None, None
        if iter_state:
            self._it.set_state(iter_state["prompts"])
            self.index, self.uses = int(iter_state["rollout"]), int(iter_state["uses"])
            if "batch" in iter_state:
                self.batch = _decode_state(iter_state["batch"])
                self.encoded = iter_state["batch"]
        self.params = None
        self.last_metrics: dict[str, float] = {}
        self.sample_rows: list[dict] = []
        ctx = LossContext(model=setup.model, config=cfg, frozen=None, train=False)
        is_ppo = cfg.objective == "ppo"

        def policy(params, frozen, batch):
            c = LossContext(model=ctx.model, config=cfg, frozen=frozen, train=False)
            logp, entropy, values = policy_forward(params, batch, c, None, is_ppo)
            return logp, entropy, values

        self._policy = jax.jit(policy)
        self._ref = jax.jit(lambda p, b: token_logps(setup.model, p, b))

    def _fit(self, split: str, path: str, records) -> tuple[list, list]:
        """Prompts fitted to the budget like SFT/DPO rows (config.data.truncation), counted by
        reason, printed, and refused above config.data.max_lost_fraction."""
        d = self.cfg.data
        stats = fit.FitStats(
            "RL prompts",
            self.max_prompt,
            fit.policy(d.truncation),
            path,
            limit_key="config.rl.max_prompt_len",
        )
        out = encode_prompts(records, self.tok, self.template, self.max_prompt, d.truncation, stats)
        self.print_fn(stats.summary())
        stats.check(d.max_lost_fraction)
        self.fit_stats[split] = stats
        return out

    @property
    def fit_metrics(self) -> dict[str, float]:
        """``data/train/*`` and ``data/eval/*`` prompt counts (the records runs' keys)."""
        out: dict[str, float] = {}
        for split, stats in self.fit_stats.items():
            out.update(stats.metrics(f"data/{split}/"))
        return out

    # -- iterator protocol ----------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batch is None or self.uses >= self.iters:
            if self.params is None:
                raise RuntimeError("RolloutSource: set .params to the current params before next()")
            self.batch = self._rollout(self.params)
            self.encoded = None
            self.uses = 0
            self.index += 1
        self.uses += 1
        return self.batch

    def get_state(self) -> dict:
        state = {"prompts": self._it.get_state(), "rollout": self.index, "uses": self.uses}
        if self.batch is not None and self.uses < self.iters:
            if self.encoded is None:
                self.encoded = _encode_state(self.batch)
            state["batch"] = self.encoded
        return state

    def close(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

    # -- rollouts -------------------------------------------------------------------------------

    def _device(self, batch):
        return jax.device_put(
            {k: np.asarray(v) for k, v in batch.items()}, self.setup.batch_sharding
        )

    def _mesh(self):
        return _MeshRules(self.setup.mesh)

    def sample(self, params, prompt_ids, seed: int, temperature: float):
        """Completions (token lists incl. EOS/stop), finish reasons, texts and timing."""
        cfg, r = self.cfg, self.cfg.rl
        sp = SamplingParams(
            r.max_new_tokens,
            self.tok.eos_id,
            temperature,
            r.top_k,
            r.top_p,
            stop_sequences=[self.stop_ids] if self.stop_ids else (),
        )
        gen = generate(
            self.setup.model,
            finetune.full_params(cfg, params, self.frozen),
            prompt_ids,
            sp,
            seed=seed,
            pad_id=self.tok.pad_id,
            mesh=self.setup.mesh,
            prompt_len_multiple=self.max_prompt,  # one prompt width: one compile for all rollouts
        )
        comps = [
            completion_tokens(t, why, self.tok.eos_id, self.stop_ids)
            for t, why in zip(gen.tokens, gen.finish_reasons)
        ]
        texts = [self.answer_text(t) for t in gen.tokens]
        return comps, gen.finish_reasons, texts, gen.timing

    def answer_text(self, tokens) -> str:
        """The completion as text: up to the template's end marker (EOS is never in ``tokens``)."""
        text = self.tok.decode(list(tokens))
        end = self.template.end
        return text.split(end, 1)[0] if end in text else text

    def score(self, records, texts) -> tuple[np.ndarray, dict[str, float]]:
        parts = {n: np.asarray(fn(records, texts), np.float32) for n, fn in self.rewards.items()}
        total = rewards_lib.combine(parts, self.weights)
        info = {f"reward/{n}": float(v.mean()) for n, v in parts.items()}
        for fn in self.rewards.values():
            for k, v in getattr(fn, "last_pass_at_k", {}).items():
                info[f"reward/{k}"] = float(v)
        return total, info

    def _rollout(self, params) -> dict:
        cfg, r = self.cfg, self.cfg.rl
        t0 = time.perf_counter()
        idx = [int(i) for i in np.asarray(next(self._it)).reshape(-1)]
        records = [self.records[i] for i in idx for _ in range(self.G)]
        prompt_ids = [self.ids[i] for i in idx for _ in range(self.G)]
        seed = _seed(cfg.seed, self.index, jax.process_index())
        comps, reasons, texts, timing = self.sample(params, prompt_ids, seed, r.temperature)
        t1 = time.perf_counter()
        scores, info = self.score(records, texts)
        t2 = time.perf_counter()
        batch = build_rows(prompt_ids, comps, cfg.data.seq_len, self.tok.pad_id)
        mask = batch["loss_mask"].astype(np.float32)
        needs_policy = self.iters > 1 or cfg.objective == "ppo"
        extra = {}
        with self._mesh():
            dev = self._device(batch)
            if needs_policy:
                logp, _, values = self._policy(params, self.frozen, dev)
                if self.iters > 1:
                    extra["old_logps"] = np.asarray(logp, np.float32) * mask
                if values is not None:
                    extra["old_values"] = np.asarray(values, np.float32) * mask
            if r.beta > 0:
                ref = self.frozen.get("reference", self.frozen.get("base"))
                extra["ref_logps"] = np.asarray(self._ref(ref, dev), np.float32) * mask
        if cfg.objective == "grpo":
            a = adv_lib.group_advantages(scores, self.G, r.scale_rewards)
            advantages = a[:, None] * mask
        else:
            token_rewards = adv_lib.sequence_rewards_on_last_token(scores, mask)
            advantages, returns = adv_lib.gae(
                token_rewards, extra["old_values"], mask, r.ppo.gamma, r.ppo.lam
            )
            if r.ppo.whiten_advantages:
                advantages = adv_lib.whiten(advantages, mask)
            extra["returns"] = returns
        batch.update(extra, advantages=advantages.astype(np.float32))
        gen_tokens = sum(len(c) for c in comps)
        lengths = np.asarray([len(c) for c in comps], np.float32)
        grouped = scores.reshape(-1, self.G)
        info.update(
            {
                "reward": float(scores.mean()),
                "reward_std": float(scores.std()),
                "reward_group_std": float(grouped.std(axis=1).mean()),
                "completion_length": float(lengths.mean()),
                "length_capped": float(np.mean([w == "length" for w in reasons])),
                "generated_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
                "generate_s": t1 - t0,
                "reward_s": t2 - t1,
                "rollout_s": time.perf_counter() - t0,
                "prefill_s": float(timing["prefill_s"]),
            }
        )
        self.last_metrics = {f"rollout/{k}": v for k, v in info.items()}
        self.sample_rows = [
            {"prompt": self.template.render(list(p.turns)), "completion": t, "reward": float(s)}
            for p, t, s in list(zip(records, texts, scores))[: r.log_samples]
        ]
        return batch

    # -- evaluation ------------------------------------------------------------------------------

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_records)

    def evaluate(self, params, step: int) -> dict[str, float]:
        """Held-out prompts: mean reward (and per component), per-sequence log-ratio to the
        reference on the policy's own completions, completion length; writes a JSONL sample."""
        cfg, r = self.cfg, self.cfg.rl
        comps, reasons, texts, _ = self.sample(
            params, self.eval_ids, _seed(cfg.seed, step, 1 << 20), r.eval_temperature
        )
        scores, info = self.score(self.eval_records, texts)
        out = {"eval/reward": float(scores.mean())}
        out.update({f"eval/{k}": v for k, v in info.items()})
        out["eval/completion_length"] = float(np.mean([len(c) for c in comps]))
        out["eval/length_capped"] = float(np.mean([w == "length" for w in reasons]))
        ref = (self.frozen or {}).get("reference", (self.frozen or {}).get("base"))
        if ref is not None:
            kl = self.sequence_log_ratio(params, ref, self.eval_ids, comps)
            out["eval/kl"] = float(kl.mean())
            if r.kl_budget and out["eval/kl"] > r.kl_budget:
                self.print_fn(
                    f"step {step}: held-out KL to the reference {out['eval/kl']:.3f} exceeds "
                    f"config.rl.kl_budget={r.kl_budget}; raise rl.beta or lower optim.lr"
                )
        if jax.process_index() == 0:
            d = os.path.join(self.workdir, "rollouts")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"eval_{step}.jsonl"), "w") as f:
                rows = list(zip(self.eval_records, texts, scores, reasons))[: r.log_samples]
                for p, t, s, why in rows:
                    rec = {
                        "step": step,
                        "prompt": self.template.render(list(p.turns)),
                        "completion": t,
                        "reference": p.reference,
                        "reward": float(s),
                        "finish": why,
                    }
                    f.write(json.dumps(rec) + "\n")
                for row in self.sample_rows:
                    f.write(json.dumps({"step": step, "train_rollout": True, **row}) + "\n")
        return out

    def sequence_log_ratio(self, params, ref, prompt_ids, comps) -> np.ndarray:
        """Per completion, ``sum_t log pi - log ref`` over its tokens (a KL(pi || ref) sample
        when the completions were sampled from pi at temperature 1)."""
        out = []
        B = self.cfg.train.global_batch_size
        policy, _ = split_value_head(params)
        ctx = LossContext(model=self.setup.model, config=self.cfg, frozen=self.frozen, train=False)
        full = ctx.model_params(policy)
        for i in range(0, len(prompt_ids), B):
            p, c = prompt_ids[i : i + B], comps[i : i + B]
            n = len(p)
            p, c = p + [p[-1]] * (B - n), c + [c[-1]] * (B - n)
            rows = build_rows(p, c, self.cfg.data.seq_len, self.tok.pad_id)
            with self._mesh():
                dev = self._device(rows)
                lp, lr = self._ref(full, dev), self._ref(ref, dev)
            d = (np.asarray(lp) - np.asarray(lr)) * rows["loss_mask"]
            out.append(d.sum(-1)[:n])
        return np.concatenate(out)


def make_source(setup, frozen, iter_state, workdir: str, print_fn: Callable = print):
    return RolloutSource(setup, frozen, iter_state, workdir, print_fn)
