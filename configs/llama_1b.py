"""Llama-3.2-1B shape (1.24B params, tied embeddings), planned for 8 x H100 with FSDP.

    lmtrain plan --config configs/llama_1b.py --devices h100:8
    lmtrain train --config configs/llama_1b.py --workdir runs/llama1b --config.data.dir=<shards>

Also the ~1B config of tools/bench.py on one GPU (--config.mesh.shape='(1,1,1)').
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.data.dir = ""  # set to the output of `lmtrain data prepare` (a 128,256-token tokenizer)
    c.data.seq_len = 4096
    c.model.update(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        d_ff=8192, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True,
        dtype="bfloat16", param_dtype="float32", remat="save_dots_and_attn_out", attention="cudnn",
    )  # fmt: skip
    # 512K tokens per step; 4 microbatches keep the float32 logits (128K vocab) within memory.
    c.train.update(steps=100_000, global_batch_size=128, microbatches=4, log_every=10,
                   eval_every=2000, checkpoint_every=2000)  # fmt: skip
    c.optim.update(lr=3e-4, warmup_steps=2000, min_lr=3e-5, b2=0.95, weight_decay=0.1)
    c.mesh.shape = (1, -1, 1)  # FSDP over every device
    return c
