"""``lmtrain export hf <workdir> <dir>``: an lmtrain checkpoint → a Hugging Face model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and no custom code (Llama,
Mistral, Qwen2 or Gemma, whichever computes exactly what the lmtrain model computes). LoRA
adapters are merged into the weights first; ``--peft`` writes only the adapters, in PEFT's
``adapter_model.safetensors`` + ``adapter_config.json`` layout. The tokenizer goes along:
an imported model's original files, else a ``tokenizer.json`` built from lmtrain's tokenizer.
``MODEL_CARD.md`` is written next to the weights.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from lmtrain.data.tokenizer import CharTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.interop import hf_arch, sp_to_hf
from lmtrain.interop.hf_import import HF_SOURCE, SOURCE_INFO, TOKENIZER_FILES
from lmtrain.interop.model_card import write_model_card
from lmtrain.interop.safetensors_io import TensorSpec, write_safetensors
from lmtrain.model import lora
from lmtrain.train import run_loader
from lmtrain.train.run_loader import LoadedModel, load_workdir

DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _np_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ConfigError(f"export dtype {name!r}: choose one of {', '.join(DTYPES)}")
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(DTYPES[name])


def combined_params(loaded: LoadedModel) -> dict:
    """Params as one tree: plain, or base + ``lora`` entry (a LoRA run stores only adapters;
    its base comes from ``run_loader.base_params``)."""
    params, cfg = loaded.params, loaded.config
    if "embedding" in params or lora.has_lora(params):
        return params
    if not run_loader.is_lora(cfg):
        raise CheckpointError(
            f"checkpoint in {loaded.workdir} has no embedding and is not a LoRA run"
        )
    return lora.combine(run_loader.base_params(cfg), params, float(cfg.lora.alpha))


def _preferred_type(workdir: str) -> str | None:
    path = os.path.join(workdir, HF_SOURCE, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("model_type")
    return None


def _get(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        if key not in tree:
            raise CheckpointError(f"param {'/'.join(path)} is missing from the checkpoint")
        tree = tree[key]
    return np.asarray(tree)


def char_tokenizer_json(tok: CharTokenizer) -> str:
    """A ``tokenizers`` WordLevel tokenizer with one token per character (same ids)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    vocab = {piece: i for i, piece in enumerate(tok.itos)}
    t = HFTok(models.WordLevel(vocab, unk_token=tok.itos[tok.unk_id]))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.specials])
    return t.to_str()


def write_tokenizer(tok: Tokenizer, workdir: str, out_dir: str) -> None:
    source = os.path.join(workdir, HF_SOURCE)
    copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]
    if copied:  # an imported model: its own files, byte for byte
        for name in copied:
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
        return
    specials = {
        "bos_token": tok.bos_id,
        "eos_token": tok.eos_id,
        "pad_token": tok.pad_id,
        "unk_token": tok.unk_id,
    }
    if isinstance(tok, SentencePieceTokenizer):
        tok.save(os.path.join(out_dir, ".sp"))
        shutil.move(
            os.path.join(out_dir, ".sp", "tokenizer.model"),
            os.path.join(out_dir, "tokenizer.model"),
        )
        shutil.rmtree(os.path.join(out_dir, ".sp"))
        names = {k: tok.sp.id_to_piece(v) for k, v in specials.items() if v >= 0}
        # A tokenizer.json that encodes exactly as SentencePiece (see sp_to_hf), loaded as is
        # by AutoTokenizer; tokenizer.model stays for tools that want the original.
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(sp_to_hf.tokenizer_json(tok.model_proto))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            # SentencePiece never turns the text "<s>" or a chat role into its control id.
            "split_special_tokens": True,
            **names,
        }
    else:
        if isinstance(tok, HFTokenizer):
            text = tok.tok.to_str()
            names = {k: tok.tok.id_to_token(v) for k, v in specials.items() if v >= 0}
        elif isinstance(tok, CharTokenizer):
            text = char_tokenizer_json(tok)
            names = {k: tok.itos[v] for k, v in specials.items()}
        else:
            raise ConfigError(f"cannot export a {tok.kind!r} tokenizer to Hugging Face format")
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    cfg["model_max_length"] = None
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)


def export_hf(
    workdir: str,
    out_dir: str,
    *,
    dtype: str = "float32",
    step: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
    model_card: bool = True,
) -> dict:
    """Writes config.json, safetensors weights, tokenizer files and MODEL_CARD.md to ``out_dir``."""
    np_dtype = _np_dtype(dtype)
    loaded = load_workdir(workdir, step)
    merged_lora = loaded.has_adapters
    params = loaded.plain_params()
    cfg = loaded.model_cfg
    model_type = hf_arch.model_type_for(cfg, _preferred_type(workdir))
    specs = []
    for name, path, _, to_hf in hf_arch.tensor_map(cfg, model_type):
        value = _get(params, path)
        shape = to_hf(value).shape  # transposes/reshapes: a view or one transient copy
        specs.append(
            TensorSpec(
                name, tuple(shape), np_dtype, lambda v=value, f=to_hf: f(np.asarray(v, np.float32))
            )
        )
    os.makedirs(out_dir, exist_ok=True)
    files = write_safetensors(out_dir, specs, max_shard_bytes=max_shard_bytes)
    tok = loaded.tokenizer
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_arch.hf_config(cfg, model_type, dtype=dtype, special_ids=ids), f, indent=2)
    gen_src = os.path.join(workdir, HF_SOURCE, "generation_config.json")
    if os.path.exists(gen_src):
        shutil.copyfile(gen_src, os.path.join(out_dir, "generation_config.json"))
    else:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in ids.items() if v >= 0}, f, indent=2)
    write_tokenizer(tok, workdir, out_dir)
    if model_card:
        write_model_card(
            out_dir, workdir, loaded.config.to_dict(), cfg, architecture=model_type, dtype=dtype
        )
    return {
        "architecture": model_type,
        "files": files,
        "step": loaded.step,
        "merged_lora": merged_lora,
        "out_dir": os.path.abspath(out_dir),
    }


def _base_model_id(workdir: str, cfg) -> str:
    """The Hugging Face id the run's base model was imported from (following ``init_from``),
    which is what PEFT's ``base_model_name_or_path`` must name."""
    seen, current = set(), workdir
    while current and current not in seen:
        seen.add(current)
        path = os.path.join(current, HF_SOURCE, SOURCE_INFO)
        if os.path.exists(path):
            with open(path) as f:
                found = json.load(f).get("hf_id")
            if found:
                return str(found)
        try:
            current = str(run_loader.read_config(current).get("init_from", "") or "")
        except Exception:  # noqa: BLE001 - a base that is not a workdir ends the chain
            break
    raise ConfigError(
        f"adapter_config.json needs the base model's Hugging Face id, and the base of {workdir} "
        f"({cfg.get('init_from') or 'none'}) was not imported with one: pass --base-model "
        "ORG/NAME (or import the base with `lmtrain import hf --hf-id ORG/NAME`)"
    )


def export_peft(
    workdir: str, out_dir: str, *, step: int | None = None, base_model: str = ""
) -> dict:
    """Adapters only, as PEFT writes them: ``lora_A`` (r, in) and ``lora_B`` (out, r) per module."""
    loaded = load_workdir(workdir, step)
    params = combined_params(loaded)
    if not lora.has_lora(params):
        raise CheckpointError(
            f"{workdir} has no LoRA adapters; `lmtrain export hf` writes full weights"
        )
    _, extra = lora.split_adapters(params)
    adapters, alpha = extra["adapters"], float(np.asarray(extra["alpha"]))
    inverse = {(m, k): t for t, (m, k, _) in lora.TARGETS.items()}
    specs, targets, rank = [], set(), None
    for layer in sorted(adapters, key=lambda n: int(n.split("_")[1])):
        i = int(layer.split("_")[1])
        for module, kernels in adapters[layer].items():
            for kernel, ab in kernels.items():
                target = inverse[(module, kernel)]
                a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
                rank = a.shape[-1]
                a2, b2 = a.reshape(-1, rank), b.reshape(rank, -1)
                prefix = f"base_model.model.model.layers.{i}.{PEFT_MODULES[target]}"
                specs.append(
                    TensorSpec(
                        f"{prefix}.lora_A.weight", (rank, a2.shape[0]), np.float32, lambda x=a2: x.T
                    )
                )
                specs.append(
                    TensorSpec(
                        f"{prefix}.lora_B.weight", (b2.shape[1], rank), np.float32, lambda x=b2: x.T
                    )
                )
                targets.add(PEFT_MODULES[target].split(".")[1])
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(out_dir, specs, filename="adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": float(loaded.config.get("lora", {}).get("dropout", 0.0)),
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": base_model or _base_model_id(workdir, loaded.config),
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {
        "r": int(rank),
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "tensors": len(specs),
        "out_dir": os.path.abspath(out_dir),
    }
