"""The README quickstart: a small Llama-style model on the embedded default corpus (stdlib sources).

Data comes from ``lmtrain data prepare --config configs/data/default.py --out data_out/stdlib``
(SentencePiece BPE, 4,096 tokens, trained on the train split only). About 3 minutes on 2 CPU cores:

    lmtrain train --config configs/quickstart.py --workdir runs/quickstart

Compute is float32 because CPUs have no fast bfloat16 matmul; on GPU/TPU use
``--config.model.dtype=bfloat16``.
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.data.dir = "data_out/stdlib"
    c.data.seq_len = 128
    c.model.update(
        vocab_size=0,  # from the tokenizer
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,  # grouped-query attention
        d_ff=384,
        max_seq_len=128,
        dtype="float32",
    )
    c.train.update(
        steps=300,
        global_batch_size=16,
        log_every=25,
        steps_per_dispatch=25,  # one jitted call per log interval (metrics stay per step)
        eval_every=100,
        eval_batches=8,
        checkpoint_every=100,
        samples=2,
        sample_tokens=120,
        sample_prompt="def ",
    )
    c.optim.update(lr=2e-3, warmup_steps=30, min_lr=2e-4, b2=0.99, weight_decay=0.1, clip_norm=1.0)
    c.mesh.shape = (-1, 1, 1)
    return c
