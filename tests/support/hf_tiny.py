"""Tiny random Hugging Face models and a tokenizer, built locally (no hub downloads)."""

from __future__ import annotations

import json
import os

VOCAB = 96
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
) * 4

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ARCH_CONFIGS = {
    "llama": dict(COMMON, rope_theta=500.0, tie_word_embeddings=False),
    "mistral": dict(COMMON, rope_theta=1000.0, sliding_window=4096, tie_word_embeddings=False),
    "qwen2": dict(COMMON, rope_theta=10000.0, tie_word_embeddings=True),
    "gemma": dict(
        COMMON,
        num_key_value_heads=1,
        head_dim=16,
        rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
}


def build_tokenizer(out_dir: str) -> None:
    """A byte-level BPE trained on a sentence, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=sorted(set(TEXT)),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 64,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def build_model(arch: str, seed: int = 0):
    """A random float32 model whose every weight (norms and biases included) is non-trivial."""
    import torch
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "gemma": transformers.GemmaConfig,
    }[arch]
    config = config_cls(**ARCH_CONFIGS[arch])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if arch == "gemma" else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def save_model(arch: str, out_dir: str, seed: int = 0, **save_kwargs):
    model = build_model(arch, seed)
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    build_tokenizer(out_dir)
    return model


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def trained_char_workdir(tmp_path_factory) -> str:
    """A tiny char-level lmtrain run (4 steps, float32), trained once per session and reused."""
    from lmtrain.train.loop import train
    from tests.support.tiny import tiny_config, write_tiny_text

    root = tmp_path_factory.getbasetemp() / "trained_char"
    workdir = root / "run"
    if not (workdir / "final_metrics.json").exists():
        root.mkdir(exist_ok=True)
        text = write_tiny_text(root / "text.txt", chars=20_000)
        cfg = tiny_config(text, steps=4, eval_batches=1)
        cfg.mesh.num_devices = 1
        train(cfg, str(workdir), print_fn=lambda *a: None)
    return str(workdir)
