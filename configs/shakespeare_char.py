"""nanoGPT's CPU "baby GPT" on tinyshakespeare, Llama-style.

Same experiment as nanoGPT's shakespeare_char on CPU: character vocabulary, first 90% train / last
10% validation, 4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000 steps, lr 1e-3 with 100
warmup steps and cosine decay to 1e-4, AdamW beta2 0.99, weight decay 0.1, clip 1.0, no dropout.
The MLP is SwiGLU with d_ff=352 (≈ 2/3 · 4 · 128, rounded to a multiple of 32), so the parameter
count matches nanoGPT's GELU MLP within 4%.

Speed: 50 steps per jitted call (``train.steps_per_dispatch``; logs, evals and checkpoints still
land on their steps) and, on CPU, one flat gradient all-reduce (``train.grad_sync=auto``).

Precision: float32 activations with bfloat16 matmul operands (float32 accumulation). On CPUs with
AMX / AVX512-BF16 the matmuls run about twice as fast as float32 ones and the elementwise maths
avoids bf16 converts; the final validation loss is unchanged (1.649 vs 1.650 in float32).

    lmtrain data fetch tinyshakespeare        # -> data/tinyshakespeare.txt, SHA-256 checked
    lmtrain train --config configs/shakespeare_char.py --workdir runs/shakespeare

Expected (2-core CPU): validation loss <= 1.89 at step 2,000; see tools/bench_shakespeare.py.
"""

from lmtrain.config import base_config


def get_config():
    c = base_config()
    c.data.path = "data/tinyshakespeare.txt"  # `lmtrain data fetch tinyshakespeare`
    c.data.tokenizer = "char"
    c.data.val_fraction = 0.1
    c.data.seq_len = 64
    c.model.update(
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        d_ff=352,
        max_seq_len=64,
        dtype="float32",
        matmul_dtype="bfloat16",
    )
    c.train.update(
        steps=2000,
        global_batch_size=12,
        steps_per_dispatch=50,  # one jitted call per 50 steps: the host work of a 20 ms step matters
        cpu_opt_level=1,  # LLVM -O1 on CPU: 25% less compile and ~1 ms less per step at this size
        log_every=250,
        eval_every=250,
        eval_batch_size=96,  # 8 train batches per eval call: fewer, larger forward passes
        eval_batches=5,  # 480 rows per periodic eval; the final eval covers the whole split
        checkpoint_every=1000,
        samples=1,
        sample_tokens=300,
    )
    c.optim.update(
        lr=1e-3, warmup_steps=100, min_lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0
    )
    c.mesh.shape = (-1, 1, 1)
    return c
