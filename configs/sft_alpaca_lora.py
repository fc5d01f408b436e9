"""Instruction tuning with LoRA on the 175 Alpaca seed tasks, starting from the quickstart run.

    lmtrain data fetch alpaca-seed-tasks      # -> data/alpaca_seed_tasks.jsonl, SHA-256 checked
    lmtrain train --config configs/sft_alpaca_lora.py --workdir runs/sft \
        --config.init_from=runs/quickstart

Objective ``sft`` (loss on response tokens only, every response ends with a trained EOS), chat
template with the tokenizer's role tokens, packed rows, rank-8 adapters on attention and MLP.
The tokenizer and the architecture come from ``init_from``; a different tokenizer is refused.
``lmtrain export hf runs/sft out/`` merges the adapters; ``--peft`` writes them alone.
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.objective = "sft"
    c.init_from = "runs/quickstart"
    c.data.train_file = "data/alpaca_seed_tasks.jsonl"  # `lmtrain data fetch alpaca-seed-tasks`
    c.data.format = "seed_tasks"
    c.data.seq_len = 128
    c.data.packing = True
    # Many seed-task responses are longer than 128 tokens: dropped and counted (see the run's
    # data summary line); raise seq_len to keep them.
    c.data.max_lost_fraction = 0.35
    c.lora.update(rank=8, alpha=16.0, targets=("attn", "mlp"))
    c.train.update(
        steps=200,
        global_batch_size=8,
        log_every=20,
        eval_every=100,
        checkpoint_every=100,
        samples=0,
    )
    c.optim.update(lr=1e-3, warmup_steps=20, min_lr=1e-4, weight_decay=0.0)
    return c
