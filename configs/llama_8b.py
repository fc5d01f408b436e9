"""Llama-3-8B shape (8.03B params), planned for a TPU v5p pod slice of 256 chips with FSDP.

    lmtrain plan --config configs/llama_8b.py --devices tpu-v5p:256

4M tokens per step (512 x 8192), splash attention, remat saving the matmul outputs.
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.data.dir = ""  # set to the output of `lmtrain data prepare` (a 128,256-token tokenizer)
    c.data.seq_len = 8192
    c.model.update(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        d_ff=14336, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False,
        dtype="bfloat16", param_dtype="float32", remat="save_dots_and_attn_out", attention="splash",
    )  # fmt: skip
    c.train.update(steps=500_000, global_batch_size=512, log_every=10, eval_every=5000,
                   checkpoint_every=1000)  # fmt: skip
    c.optim.update(lr=3e-4, warmup_steps=2000, min_lr=3e-5, b2=0.95, weight_decay=0.1)
    c.mesh.shape = (1, -1, 1)  # FSDP over the slice
    return c
