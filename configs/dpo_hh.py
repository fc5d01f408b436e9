"""DPO on the Anthropic hh-rlhf harmless preference pairs, starting from an SFT run.

    lmtrain data fetch hh-rlhf-harmless       # -> data/hh_rlhf_harmless_test.jsonl.gz, SHA-256 checked
    lmtrain train --config configs/dpo_hh.py --workdir runs/dpo --config.init_from=runs/sft

Dialogues share a prefix and are split at the last assistant turn into prompt / chosen /
rejected. The reference log-probs are computed once before training (``dpo.reference =
'precomputed'``); metrics: rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin.
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.objective = "dpo"
    c.init_from = "runs/sft"
    c.data.train_file = "data/hh_rlhf_harmless_test.jsonl.gz"  # see the fetch line above
    c.data.seq_len = 128
    # Pairs whose longer response does not fit 128 tokens are dropped and counted.
    c.data.max_lost_fraction = 0.3
    c.dpo.update(beta=0.1, reference="precomputed", nll_weight=0.0)
    c.train.update(
        steps=200,
        global_batch_size=8,
        log_every=20,
        eval_every=100,
        checkpoint_every=100,
        samples=0,
    )
    c.optim.update(lr=5e-5, warmup_steps=20, min_lr=5e-6, weight_decay=0.0)
    return c
