"""SFT → GRPO with an exact-match reward on the arithmetic tasks, next to SFT → DPO.

    .venv/bin/python experiments/grpo_arithmetic.py --workdir runs/recipe

Runs experiments/sft_dpo_arithmetic.py first (pre-train, SFT, DPO; skipped when its
``report.json`` is already in the workdir), then GRPO (objective ``grpo``) from the same SFT run on
the DPO stage's training prompts: groups of ``--group`` sampled answers per prompt, reward 1 for
the exact answer, group-normalised advantages, k3 KL to the SFT model. Every stage is scored on
the same held-out prompts (greedy exact match, per task); the table goes to
``<workdir>/grpo_report.json`` and the console.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import sft_dpo_arithmetic as base  # noqa: E402

from lmtrain.data import finetune_data  # noqa: E402
from lmtrain.data.tokenizer import CHAT_SPECIALS, CharTokenizer  # noqa: E402
from lmtrain.train.loop import train  # noqa: E402

KINDS = ("add", "rev", "sort")


def scores(cfg, params, tok, test_tasks) -> dict:
    answers, eos = base.greedy_answers(base.model_of(cfg), params, tok, [q for q, _ in test_tasks])
    by_kind = {
        k: base.exact_match(
            [a for a, (q, _) in zip(answers, test_tasks) if q.startswith(k)],
            [t for t in test_tasks if t[0].startswith(k)],
        )
        for k in KINDS
    }
    return {
        "exact_match": base.exact_match(answers, test_tasks),
        "exact_match_by_task": by_kind,
        "ends_with_eos": eos,
    }


def grpo_config(args, wd: str, files: dict):
    c = base.common_config(args.scale)
    c.objective = "grpo"
    c.init_from = os.path.join(wd, "sft")
    c.data.update(train_file=files["train"], eval_file=files["test"], seq_len=32)
    c.rl.update(
        group_size=args.group,
        max_new_tokens=base.MAX_NEW,
        temperature=1.0,
        beta=args.beta,
        rewards=("exact_match",),
        loss_norm="token",
        eval_temperature=0.0,
        log_samples=8,
    )
    c.train.update(
        steps=args.steps,
        global_batch_size=args.prompts * args.group,
        log_every=max(1, args.steps // 10),
        eval_every=max(1, args.steps // 2),
    )
    c.optim.update(lr=args.lr, warmup_steps=min(5, args.steps // 5), min_lr=args.lr / 10)
    c.optim.weight_decay = 0.0
    return c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/sft_dpo_recipe")
    ap.add_argument("--scale", type=float, default=1.0, help="the SFT/DPO recipe's --scale")
    ap.add_argument("--n_test", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=16, help="sampled answers per prompt")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--name", default="grpo", help="the GRPO run's directory in the workdir")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    wd = os.path.abspath(args.workdir)
    report_path = os.path.join(wd, "report.json")
    if not os.path.isfile(report_path):
        base.main([f"--workdir={wd}", f"--scale={args.scale}", f"--n_test={args.n_test}"])
    with open(report_path) as f:
        prior = json.load(f)
    train_tasks, test_tasks = base.split_tasks(6000, args.n_test)
    tok = CharTokenizer.train([base.LETTERS + "0123456789 =\n"], extra_specials=CHAT_SPECIALS)
    files = {
        "train": os.path.join(wd, "grpo_train.jsonl"),
        "test": os.path.join(wd, "grpo_test.jsonl"),
    }
    for name, tasks in (("train", train_tasks[4000:]), ("test", test_tasks)):
        finetune_data.write_jsonl(files[name], ({"prompt": q, "answer": a} for q, a in tasks))
    cfg = grpo_config(args, wd, files)
    print(
        f"GRPO: {cfg.train.steps} steps x {args.prompts} prompts x {args.group} samples, "
        f"lr {args.lr}, beta {args.beta}",
        flush=True,
    )
    out = train(cfg, os.path.join(wd, args.name), print_fn=lambda m: print(m, flush=True))
    after = scores(cfg, jax.device_get(out["state"].params), tok, test_tasks)
    table = {
        "after_sft": prior["after_sft"],
        "after_dpo": prior["after_dpo"],
        "after_grpo": after
        | {k: out.get(f"eval/{k}") for k in ("kl", "reward", "completion_length")},
        "grpo_wall_time_s": time.perf_counter() - t0,
        "grpo_config": json.loads(cfg.to_json()),
    }
    with open(os.path.join(wd, f"{args.name}_report.json"), "w") as f:
        json.dump(table, f, indent=2)
    print("\n| stage | exact match | add | rev | sort | ends with EOS |\n|---|---|---|---|---|---|")
    for stage in ("after_sft", "after_dpo", "after_grpo"):
        r = table[stage]
        k = r["exact_match_by_task"]
        print(
            f"| {stage} | {r['exact_match']:.3f} | {k['add']:.3f} | {k['rev']:.3f} | "
            f"{k['sort']:.3f} | {r['ends_with_eos']:.3f} |"
        )
    return table


if __name__ == "__main__":
    main()
