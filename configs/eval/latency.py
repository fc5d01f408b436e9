"""Cost only: generation throughput, time to first token and per-token latency at batch 1 and 8.

lmtrain eval --checkpoint runs/shakespeare --config configs/eval/latency.py --out eval/latency
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.title = "generation latency"
    c.tasks = []
    c.latency = dict(batch_sizes=[1, 8], prompt_tokens=32, new_tokens=128, repeats=10)
    return c
