"""Llama-3-70B shape (70.6B params), planned for 2,048 H100s: FSDP across nodes, tensor 8 in a node.

    lmtrain plan --config configs/llama_70b.py --devices h100:2048

8M tokens per step (1024 x 8192); full remat, cuDNN attention.
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.data.dir = ""  # set to the output of `lmtrain data prepare` (a 128,256-token tokenizer)
    c.data.seq_len = 8192
    c.model.update(
        vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
        d_ff=28672, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False,
        dtype="bfloat16", param_dtype="float32", remat="full", attention="cudnn",
    )  # fmt: skip
    c.train.update(steps=500_000, global_batch_size=1024, log_every=10, eval_every=5000,
                   checkpoint_every=500)  # fmt: skip
    c.optim.update(lr=1.5e-4, warmup_steps=2000, min_lr=1.5e-5, b2=0.95, weight_decay=0.1)
    c.mesh.shape = (1, -1, 8)  # FSDP x tensor 8 (one NVLink node)
    return c
