"""Pre-train → SFT → DPO on generated tasks with exact answers, all through ``lmtrain.train.loop``.

    .venv/bin/python experiments/sft_dpo_arithmetic.py --workdir runs/recipe

1. **Data.** Three tasks with one correct answer each: ``add 23 58`` → ``81``, ``rev lamp`` →
   ``pmal``, ``sort 4132`` → ``1234``. Prompts are split into disjoint train / held-out sets.
   The pre-training corpus states train-set facts as plain text (``add 23 58 = 81``); SFT and DPO
   use the chat template (``<|user|>``, ``<|assistant|>``, ``<|end|>`` are special tokens of the
   char tokenizer, and every response ends with EOS).
2. **Pre-train** a ~0.8M-parameter Llama-style model (objective ``lm``) on that text.
3. **SFT** from the pre-trained checkpoint (``config.init_from``), loss on responses only.
4. **DPO** from the SFT checkpoint: chosen = the correct answer, rejected = the SFT model's own
   wrong answer when it has one (greedy, else one of ``N_SAMPLES`` samples at temperature 1 on
   training prompts; greedy only on held-out ones), else a corrupted answer (one digit or letter
   changed). DPO adds an NLL term on the chosen answer (``config.dpo.nll_weight``, RPO) and uses
   a small lr: plain DPO at lr 1e-4 raised reward accuracy but lowered exact match 0.940 → 0.827.

After each stage it prints, on held-out prompts: exact match of greedy answers, the fraction of
generations that end with EOS before the length cap, and (for the DPO pairs) the implicit reward
accuracy ``beta * (log pi - log ref)`` chosen > rejected (strict) and the log-likelihood preference.
The whole recipe is CPU-sized (about 10-15 minutes on 2 cores); ``--scale 0.3`` is a quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmtrain.config import base_config  # noqa: E402
from lmtrain.data import finetune_data  # noqa: E402
from lmtrain.data.tokenizer import CHAT_SPECIALS, CharTokenizer  # noqa: E402
from lmtrain.infer.sampling import SamplingParams, generate  # noqa: E402
from lmtrain.model.config import ModelConfig  # noqa: E402
from lmtrain.model.transformer import Transformer  # noqa: E402
from lmtrain.train.loop import train  # noqa: E402
from lmtrain.train.losses.dpo import pair_logps  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_NEW = 12  # answers are at most 6 characters + <|end|>; the cap for "ends with EOS"
N_SAMPLES = 3  # temperature-1 samples per DPO training prompt, searched for on-policy mistakes


# ---- tasks -------------------------------------------------------------------------------------


def make_task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("add", "rev", "sort"))
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"add {a} {b}", str(a + b)
    if kind == "rev":
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        return f"rev {w}", w[::-1]
    d = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return f"sort {d}", "".join(sorted(d))


def split_tasks(n_train: int, n_test: int, seed: int = 0):
    """Disjoint prompt sets (a held-out prompt never appears in any training stage)."""
    rng = random.Random(seed)
    seen, train_set, test_set = set(), [], []
    while len(train_set) + len(test_set) < n_train + n_test:
        q, a = make_task(rng)
        if q in seen:
            continue
        seen.add(q)
        (test_set if len(test_set) < n_test else train_set).append((q, a))
    return train_set, test_set


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same kind: one character changed."""
    pool = "0123456789" if answer.isdigit() else LETTERS
    i = rng.randrange(len(answer))
    c = rng.choice([x for x in pool if x != answer[i]])
    return answer[:i] + c + answer[i + 1 :]


def pretrain_docs(tasks, rng: random.Random, n_docs: int) -> list[str]:
    return ["\n".join(f"{q} = {a}" for q, a in rng.sample(tasks, 12)) for _ in range(n_docs)]


# ---- evaluation --------------------------------------------------------------------------------


def model_of(cfg) -> Transformer:
    return Transformer(ModelConfig.from_config(cfg.model))


def greedy_answers(
    model, params, tok, prompts: list[str], temperature: float = 0.0, seed: int = 0
) -> tuple[list[str], float]:
    """Greedy (or sampled) answers (text before ``<|end|>``) and the fraction that stopped
    with EOS."""
    from lmtrain.data.finetune_data import chat_template_for

    template = chat_template_for(tok)
    ids = [template.encode_generation_prompt([("user", p)], tok) for p in prompts]
    end = tok.token_id("<|end|>")
    answers, stopped = [], 0
    for i in range(0, len(ids), 256):
        sp = SamplingParams(MAX_NEW, tok.eos_id, temperature)
        outs = generate(model, params, ids[i : i + 256], sp, seed=seed, pad_id=tok.pad_id).tokens
        for o in outs:
            stopped += len(o) < MAX_NEW  # EOS came before the cap (EOS itself is not returned)
            answers.append(tok.decode(o[: o.index(end)] if end in o else o))
    return answers, stopped / len(prompts)


def exact_match(answers, tasks) -> float:
    return float(np.mean([a == t for a, (_, t) in zip(answers, tasks)]))


def pair_accuracies(model, policy, reference, rows, beta: float) -> dict:
    """Implicit-reward accuracy (strict) and log-likelihood preference on preference rows."""
    fn = jax.jit(lambda p, b: pair_logps(model, p, b))
    pc, pr, rc, rr = [], [], [], []
    for batch in finetune_data.eval_batches(rows, batch_size=64):
        a, b = fn(policy, batch)
        c, d = fn(reference, batch)
        pc.append(a), pr.append(b), rc.append(c), rr.append(d)
    n = finetune_data.num_rows(rows)
    pc, pr, rc, rr = (np.concatenate(x)[:n] for x in (pc, pr, rc, rr))
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {
        "reward_accuracy": float(np.mean(chosen > rejected)),
        "reward_margin": float(np.mean(chosen - rejected)),
        "loglik_preference": float(np.mean(pc > pr)),
    }


# ---- configs -----------------------------------------------------------------------------------


def common_config(scale: float):
    c = base_config()
    c.model.update(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=352, max_seq_len=64, dtype="float32"
    )
    c.data.seq_len = 64
    c.train.update(
        global_batch_size=32,
        log_every=50,
        eval_every=10**6,
        eval_batches=0,
        checkpoint_every=10**6,
        samples=0,
        async_checkpoint=False,
    )
    c.mesh.shape = (-1, 1, 1)
    c.mesh.num_devices = 1
    return c


def steps(n: int, scale: float) -> int:
    return max(10, int(n * scale))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/sft_dpo_recipe")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps")
    ap.add_argument("--n_test", type=int, default=300)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    wd = os.path.abspath(args.workdir)
    os.makedirs(wd, exist_ok=True)
    rng = random.Random(0)
    train_tasks, test_tasks = split_tasks(6000, args.n_test)
    sft_tasks, dpo_tasks = train_tasks[:4000], train_tasks[4000:]
    tok = CharTokenizer.train([LETTERS + "0123456789 =\n"], extra_specials=CHAT_SPECIALS)
    report: dict = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    def stage_eval(name: str, cfg, params) -> None:
        model = model_of(cfg)
        answers, eos = greedy_answers(model, params, tok, [q for q, _ in test_tasks])
        em = exact_match(answers, test_tasks)
        by_kind = {
            k: exact_match(
                [a for a, (q, _) in zip(answers, test_tasks) if q.startswith(k)],
                [t for t in test_tasks if t[0].startswith(k)],
            )
            for k in ("add", "rev", "sort")
        }
        report[name] = {
            "exact_match": em,
            "ends_with_eos": eos,
            "exact_match_by_task": by_kind,
            "examples": [(q, a) for (q, _), a in list(zip(test_tasks, answers))[:3]],
        }
        log(
            f"{name}: held-out exact match {em:.3f} {by_kind} | ends with EOS {eos:.3f} | "
            f"e.g. {report[name]['examples']}"
        )

    # 1. pre-train ------------------------------------------------------------------------------
    data_dir = os.path.join(wd, "data")
    finetune_data.write_token_dataset(
        data_dir,
        tok,
        {
            "train": pretrain_docs(sft_tasks + dpo_tasks, rng, 3000),
            "validation": pretrain_docs(test_tasks, rng, 100),
        },
    )
    pre = common_config(args.scale)
    pre.objective = "lm"
    pre.data.dir = data_dir
    pre.train.steps = steps(1000, args.scale)
    pre.optim.update(
        lr=2e-3, warmup_steps=min(50, pre.train.steps // 5), min_lr=2e-4, weight_decay=0.1
    )
    log(f"pre-train: {pre.train.steps} steps")
    out = train(pre, os.path.join(wd, "pretrain"), print_fn=log)
    report["pretrain"] = {"eval_loss": out["eval/loss"], "steps": pre.train.steps}
    stage_eval("pretrained", pre, jax.device_get(out["state"].params))

    # 2. SFT -------------------------------------------------------------------------------------
    sft_file, test_file = os.path.join(wd, "sft_train.jsonl"), os.path.join(wd, "sft_test.jsonl")
    finetune_data.write_jsonl(sft_file, ({"prompt": q, "response": a} for q, a in sft_tasks))
    finetune_data.write_jsonl(test_file, ({"prompt": q, "response": a} for q, a in test_tasks))
    sft = common_config(args.scale)
    sft.objective = "sft"
    sft.init_from = os.path.join(wd, "pretrain")
    sft.data.update(train_file=sft_file, eval_file=test_file)
    sft.train.steps = steps(400, args.scale)
    sft.optim.update(
        lr=1e-3, warmup_steps=min(20, sft.train.steps // 5), min_lr=1e-4, weight_decay=0.0
    )
    log(f"SFT: {sft.train.steps} steps on {len(sft_tasks)} examples")
    out = train(sft, os.path.join(wd, "sft"), print_fn=log)
    sft_params = jax.device_get(out["state"].params)
    report["sft"] = {"eval_loss": out["eval/loss"], "steps": sft.train.steps}
    stage_eval("after_sft", sft, sft_params)

    # 3. DPO pairs: correct vs the SFT model's own mistakes (else a corruption) -----------------
    model = model_of(sft)
    pairs = {}
    for name, tasks in (("train", dpo_tasks), ("test", test_tasks)):
        prompts = [q for q, _ in tasks]
        candidates = [greedy_answers(model, sft_params, tok, prompts)[0]]
        if name == "train":  # on-policy mistakes: sampled answers where greedy is right
            candidates += [
                greedy_answers(model, sft_params, tok, prompts, temperature=1.0, seed=s)[0]
                for s in range(N_SAMPLES)
            ]
        recs, own = [], 0
        for k, (q, a) in enumerate(tasks):
            wrong = next((c[k] for c in candidates if c[k] != a and c[k]), None)
            own += wrong is not None
            recs.append({"prompt": q, "chosen": a, "rejected": wrong or corrupt(a, rng)})
        pairs[name] = os.path.join(wd, f"dpo_{name}.jsonl")
        finetune_data.write_jsonl(pairs[name], recs)
        log(f"DPO {name} pairs: {len(recs)} ({own} rejected answers are the SFT model's own)")
    dpo = common_config(args.scale)
    dpo.objective = "dpo"
    dpo.init_from = os.path.join(wd, "sft")
    dpo.data.update(train_file=pairs["train"], eval_file=pairs["test"], seq_len=32)
    # nll_weight 2 + lr 3e-5 kept held-out exact match at the SFT level in a sweep from the same
    # SFT model (lr 1e-4 / 5e-5 with nll_weight 1: 0.920 / 0.933; without the NLL term: 0.827).
    dpo.dpo.update(beta=0.1, nll_weight=2.0, degenerate_patience=5)
    dpo.train.steps = steps(150, args.scale)
    dpo.train.log_every = 25
    dpo.optim.update(
        lr=3e-5, warmup_steps=min(10, dpo.train.steps // 5), min_lr=3e-6, weight_decay=0.0
    )
    template_rows = finetune_data.rows_for_objective(dpo, tok, pairs["test"])
    before = pair_accuracies(model, sft_params, sft_params, template_rows, dpo.dpo.beta)
    report["before_dpo"] = before | {"exact_match": report["after_sft"]["exact_match"]}
    log(
        f"before DPO (policy = reference): held-out reward accuracy {before['reward_accuracy']:.3f} "
        f"(strict >, so ties count as wrong), log-likelihood preference {before['loglik_preference']:.3f}"
    )
    log(
        f"DPO: {dpo.train.steps} steps, beta {dpo.dpo.beta}, nll_weight {dpo.dpo.nll_weight}, "
        f"lr {dpo.optim.lr}"
    )
    out = train(dpo, os.path.join(wd, "dpo"), print_fn=log)
    dpo_params = jax.device_get(out["state"].params)
    after = pair_accuracies(model, dpo_params, sft_params, template_rows, dpo.dpo.beta)
    report["after_dpo_pairs"] = after | {
        "loop_eval_reward_accuracy": out.get("eval/rewards/accuracy")
    }
    log(
        f"after DPO: held-out reward accuracy {after['reward_accuracy']:.3f} (loop eval: "
        f"{out.get('eval/rewards/accuracy', float('nan')):.3f}), margin {after['reward_margin']:.3f}, "
        f"log-likelihood preference {after['loglik_preference']:.3f}"
    )
    stage_eval("after_dpo", dpo, dpo_params)
    report["wall_time_s"] = time.perf_counter() - t0
    with open(os.path.join(wd, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"done in {report['wall_time_s'] / 60:.1f} min; report: {wd}/report.json")
    return report


if __name__ == "__main__":
    main()
