"""RLHF on hh-rlhf prompts: SFT → reward model on the pairs → GRPO (or PPO) against that reward model.

    .venv/bin/python experiments/rlhf_hh.py --data data/hh_rlhf_harmless_test.jsonl.gz --workdir runs/rlhf

``--data``: the hh-rlhf pairs (``lmtrain data fetch`` writes them under ``data/``). The pairs are
split into train and held-out; a char-level policy is fine-tuned on the chosen dialogues (SFT), a
reward model (objective ``reward``) is trained on the train pairs from that SFT model, then the
policy is optimised online against the reward model (objective ``grpo`` or ``ppo``, reward plug-in
``reward_model``) with a k3 KL penalty to the SFT model. Before and after, it reports on held-out
prompts the reward model's mean score of sampled completions and the per-sequence KL estimate to
the reference (``sum log pi - log ref`` over a completion sampled at temperature 1), writes the
curves to ``rlhf_curves.png``, a table to ``rlhf_report.json``, and rollout generated tokens/s
next to training tokens/s. CPU-sized: a few minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lmtrain.config import base_config  # noqa: E402
from lmtrain.data import finetune_data  # noqa: E402
from lmtrain.data.formats import read_preferences  # noqa: E402
from lmtrain.data.tokenizer import CHAT_SPECIALS, CharTokenizer  # noqa: E402
from lmtrain.train import finetune  # noqa: E402
from lmtrain.train.loop import build, train  # noqa: E402
from lmtrain.train.rollout import RolloutSource  # noqa: E402


def small_config(args, tok_dir: str):
    c = base_config()
    c.model.update(
        d_model=args.d_model,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        d_ff=int(args.d_model * 2.75),
        max_seq_len=args.seq_len,
        dtype="float32",
    )
    c.data.update(tokenizer=tok_dir, seq_len=args.seq_len)
    c.train.update(
        global_batch_size=16,
        log_every=10,
        eval_every=10**6,
        checkpoint_every=10**6,
        samples=0,
        async_checkpoint=False,
    )
    c.mesh.shape, c.mesh.num_devices = (-1, 1, 1), 1
    return c


def split_pairs(path: str, n_eval: int, seed: int = 0):
    # SFT refuses empty responses; a few hh-rlhf pairs have one
    pairs = [p for p in read_preferences(path) if p.chosen.strip() and p.rejected.strip()]
    random.Random(seed).shuffle(pairs)
    return pairs[n_eval:], pairs[:n_eval]


def pair_record(p) -> dict:
    return {
        "prompt": [{"role": r, "content": c} for r, c in p.prompt.turns],
        "chosen": p.chosen,
        "rejected": p.rejected,
    }


def sft_record(p) -> dict:
    turns = [{"role": r, "content": c} for r, c in p.prompt.turns]
    return {"messages": turns + [{"role": "assistant", "content": p.chosen}]}


def prompt_chars(p) -> int:
    return sum(len(c) + 4 for _, c in p.prompt.turns)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], before: dict, out_png: str, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in rows if "train/rollout/reward" in r]
    ev = [{"step": 0, "eval/reward": before["eval/reward"], "eval/kl": before["eval/kl"]}]
    ev += [r for r in rows if "eval/reward" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in tr], [r["train/rollout/reward"] for r in tr], label="rollouts")
    ax[0].plot(
        [r["step"] for r in ev], [r["eval/reward"] for r in ev], "o-", label="held-out prompts"
    )
    ax[0].set(xlabel="step", ylabel="reward-model score", title="reward")
    ax[0].legend()
    ax[1].plot([r["step"] for r in ev], [r["eval/kl"] for r in ev], "o-", label="held-out")
    if budget:
        ax[1].axhline(budget, color="r", ls="--", label="kl_budget")
    ax[1].set(xlabel="step", ylabel="nats / sequence", title="KL to the SFT reference")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/hh_rlhf_harmless_test.jsonl.gz")
    ap.add_argument("--workdir", default="runs/rlhf_hh")
    ap.add_argument("--objective", default="grpo", choices=("grpo", "ppo"))
    ap.add_argument("--seq_len", type=int, default=160)
    ap.add_argument("--d_model", type=int, default=64)
    ap.add_argument("--max_prompt_chars", type=int, default=100)
    ap.add_argument("--n_eval", type=int, default=300, help="held-out pairs (prompts)")
    ap.add_argument("--eval_prompts", type=int, default=32)
    ap.add_argument("--sft_steps", type=int, default=150)
    ap.add_argument("--rm_steps", type=int, default=100)
    ap.add_argument("--rl_steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--kl_budget", type=float, default=10.0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    wd = os.path.abspath(args.workdir)
    os.makedirs(wd, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    train_pairs, eval_pairs = split_pairs(args.data, args.n_eval)
    texts = [c for p in train_pairs + eval_pairs for _, c in p.prompt.turns]
    texts += [p.chosen for p in train_pairs] + [p.rejected for p in train_pairs]
    tok = CharTokenizer.train(texts, extra_specials=CHAT_SPECIALS)
    tok_dir = os.path.join(wd, "tokenizer")
    tok.save(tok_dir)
    names = ("sft", "pairs", "eval_pairs", "rl_train", "rl_eval")
    f = {k: os.path.join(wd, f"{k}.jsonl") for k in names}
    finetune_data.write_jsonl(f["eval_pairs"], (pair_record(p) for p in eval_pairs))
    finetune_data.write_jsonl(f["sft"], (sft_record(p) for p in train_pairs))
    finetune_data.write_jsonl(f["pairs"], (pair_record(p) for p in train_pairs))
    short = [p for p in train_pairs if prompt_chars(p) <= args.max_prompt_chars]
    held = [p for p in eval_pairs if prompt_chars(p) <= args.max_prompt_chars]
    finetune_data.write_jsonl(f["rl_train"], (pair_record(p) for p in short))
    finetune_data.write_jsonl(f["rl_eval"], (pair_record(p) for p in held[: args.eval_prompts]))
    log(
        f"{len(train_pairs)} train pairs, {len(short)} short RL prompts, "
        f"{min(len(held), args.eval_prompts)} held-out prompts; vocab {tok.vocab_size}"
    )
    report: dict = {"args": vars(args)}

    # 1. SFT on the chosen dialogues (from scratch: the policy and the reward model's backbone)
    sft = small_config(args, tok_dir)
    sft.objective = "sft"
    sft.data.train_file = f["sft"]
    sft.train.steps = args.sft_steps
    sft.optim.update(
        lr=2e-3, warmup_steps=min(10, args.sft_steps // 5), min_lr=2e-4, weight_decay=0.0
    )
    out = train(sft, os.path.join(wd, "sft"), print_fn=log)
    report["sft_loss"] = out.get("train/loss")

    # 2. reward model on the pairs, from the SFT model
    rm = small_config(args, tok_dir)
    rm.objective = "reward"
    rm.init_from = os.path.join(wd, "sft")
    rm.data.update(train_file=f["pairs"], eval_file=f["eval_pairs"])
    rm.train.steps = args.rm_steps
    rm.optim.update(
        lr=1e-3, warmup_steps=min(10, args.rm_steps // 5), min_lr=1e-4, weight_decay=0.0
    )
    out = train(rm, os.path.join(wd, "reward"), print_fn=log)
    report["reward_model_heldout_accuracy"] = out.get("eval/accuracy")
    log(f"reward model: held-out pair accuracy {out.get('eval/accuracy', float('nan')):.3f}")

    # 3. online RL against the reward model
    rl = small_config(args, tok_dir)
    rl.objective = args.objective
    rl.init_from = os.path.join(wd, "sft")
    rl.data.update(train_file=f["rl_train"], eval_file=f["rl_eval"])
    rl.rl.update(
        group_size=4,
        max_new_tokens=32,
        temperature=1.0,
        beta=args.beta,
        rewards=("reward_model",),
        reward_model=os.path.join(wd, "reward"),
        eval_temperature=1.0,  # sampled: the held-out KL is then an estimate of KL(pi || ref)
        kl_budget=args.kl_budget,
        loss_norm="token",
    )
    rl.train.update(steps=args.rl_steps, log_every=1, eval_every=max(1, args.rl_steps // 3))
    rl.optim.update(
        lr=args.lr, warmup_steps=min(3, args.rl_steps // 3), min_lr=args.lr / 10, weight_decay=0.0
    )
    rl_dir = os.path.join(wd, args.objective)
    # before: the SFT policy itself on the held-out prompts (reference = policy, KL = 0)
    setup = build(rl.copy_and_resolve_references(), rl_dir + "_before")
    initial, _ = finetune.initial_params(setup)
    src = RolloutSource(setup, {"reference": initial}, None, rl_dir + "_before", log)
    before = src.evaluate(initial, 0)
    log(f"before {args.objective}: held-out RM score {before['eval/reward']:.4f}")
    out = train(rl, rl_dir, print_fn=log)
    rows = read_metrics(os.path.join(rl_dir, "metrics.jsonl"))
    tr = [r for r in rows if "train/rollout/generated_tokens_per_s" in r]
    gen_tps = float(np.mean([r["train/rollout/generated_tokens_per_s"] for r in tr[1:]]))
    # training tokens/s: the step's rows x seq_len over the step time without the rollout
    tokens = rl.train.global_batch_size * rl.data.seq_len
    train_tps = float(
        np.mean(
            [
                tokens / max(r["train/step_time_s"] - r["train/rollout/rollout_s"], 1e-9)
                for r in tr[1:]
            ]
        )
    )
    report.update(
        before={k: before[k] for k in ("eval/reward", "eval/kl", "eval/completion_length")},
        after={k: out[k] for k in ("eval/reward", "eval/kl", "eval/completion_length")},
        kl_budget=args.kl_budget,
        rollout_generated_tokens_per_s=gen_tps,
        training_tokens_per_s=train_tps,
        eval_curve=[
            {"step": r["step"], "reward": r["eval/reward"], "kl": r["eval/kl"]}
            for r in rows
            if "eval/reward" in r
        ],
        wall_time_s=time.perf_counter() - t0,
    )
    plot(rows, before, os.path.join(wd, "rlhf_curves.png"), args.kl_budget)
    with open(os.path.join(wd, "rlhf_report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    log(
        f"held-out RM score {before['eval/reward']:.4f} -> {out['eval/reward']:.4f}; KL "
        f"{before['eval/kl']:.3f} -> {out['eval/kl']:.3f} (budget {args.kl_budget}); rollout "
        f"{gen_tps:,.0f} generated tok/s, training {train_tps:,.0f} tok/s; "
        f"samples in {rl_dir}/rollouts/"
    )
    return report


if __name__ == "__main__":
    main()
