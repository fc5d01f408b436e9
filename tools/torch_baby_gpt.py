"""A PyTorch reference for the shakespeare benchmark: nanoGPT's CPU "baby GPT" recipe, run here.

    python tools/torch_baby_gpt.py [--data data/tinyshakespeare.txt] [--steps 2000]

Why: wall times on shared machines drift between days, so a speed ratio against a number
measured once (nanoGPT's published run) is only as good as that day.
``tools/bench_shakespeare.py`` runs this script in the same session and reports the ratio against it.

The recipe is nanoGPT's documented CPU run (eager PyTorch, no ``torch.compile``): GPT-2 style model
(learned positions, LayerNorm without bias, GELU MLP 4x, tied embeddings), 4 layers, 4 heads,
128 wide, block 64, batch 12, dropout 0, AdamW (0.9, 0.99) weight decay 0.1 on matrices, lr 1e-3 with
100 linear warmup steps and cosine decay to 1e-4 at step 2,000, clip 1.0, batches drawn at random
offsets, and 20 train + 20 val batches evaluated every 250 steps. Written for this project from that
description; needs the ``hf`` extra (torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np


def build(vocab: int, n_layer: int = 4, n_head: int = 4, d: int = 128, block: int = 64):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d, bias=False)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.proj = nn.Linear(d, d, bias=False)
            self.ln2 = nn.LayerNorm(d, bias=False)
            self.up = nn.Linear(d, 4 * d, bias=False)
            self.down = nn.Linear(4 * d, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, n_head, d // n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(block, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d, bias=False)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.wte.weight  # tied
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = (
                        0.02 / math.sqrt(2 * n_layer)
                        if name.endswith(("proj.weight", "down.weight"))
                        else 0.02
                    )
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            t = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(t))
            for blk in self.blocks:
                x = blk(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def lr_at(it: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / max(1, decay_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def run(data_path: str, steps: int = 2000, eval_every: int = 250, eval_iters: int = 20) -> dict:
    """Train the reference end to end (data encoding included); return loss and timings."""
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(1337)
    text = open(data_path, encoding="utf-8").read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(ids))
    splits = {"train": torch.from_numpy(ids[:n]), "val": torch.from_numpy(ids[n:])}
    block, batch = 64, 12

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([data[i : i + block] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
        return x, y

    model = build(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = float(
                np.mean([model(*get_batch(split)).item() for _ in range(eval_iters)])
            )
        model.train()
        return out

    evals, t_train, t_loop = [], 0.0, time.perf_counter()
    for it in range(steps + 1):
        if it % eval_every == 0:
            evals.append({"step": it, **estimate()})
        if it == steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it, 1e-3, 1e-4, 100, steps)
        t = time.perf_counter()
        x, y = get_batch("train")
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t
    loop_s = time.perf_counter() - t_loop
    return {
        "val_loss": evals[-1]["val"],
        "wall_s": time.perf_counter() - t0,
        "train_loop_s": loop_s,  # steps and evals, as lmtrain's loop time counts them
        "ms_per_step": 1e3 * loop_s / steps,
        "ms_per_train_step": 1e3 * t_train / steps,  # the training steps alone
        "steps": steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "evals": evals,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare.txt"),
    )
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    out = run(args.data, args.steps)
    print(
        f"torch baby GPT: val loss {out['val_loss']:.4f} @ {out['steps']} | wall {out['wall_s']:.1f} s | "
        f"{out['ms_per_step']:.1f} ms/step with evals ({out['ms_per_train_step']:.1f} training alone) | torch {out['torch']} ({out['threads']} threads)"
    )
    print(json.dumps({k: v for k, v in out.items() if k != "evals"}))


if __name__ == "__main__":
    main()
