"""``lmtrain import hf <dir> --out <workdir>``: a Hugging Face model → an lmtrain workdir.

Tensors stream one at a time: each is memory-mapped from its safetensors file, converted to
lmtrain's layout and written to a memory-mapped scratch ``.npy`` on the destination disk, so
peak RAM is about one tensor whatever the model size. The scratch arrays are then saved as an
Orbax checkpoint (step 0, ``{'params': ...}``) and deleted.

The workdir gets ``config.json`` (``data.dir`` points at the workdir, whose ``tokenizer/`` is the
model's tokenizer, so ``lmtrain generate --checkpoint <workdir>`` works as is), ``tokenizer/``
and ``hf_source/`` (the original config and tokenizer files, used again by ``export hf``, and
``source.json``: where the model came from, including its Hugging Face id when known, which
``export hf --peft`` records as the adapters' base model).

A weights-only folder (no ``tokenizer.json`` / ``tokenizer.model``) imports with
``--tokenizer PATH``: a Hugging Face tokenizer folder or file, a SentencePiece ``.model``, or an
lmtrain tokenizer folder.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from lmtrain.config import base_config, to_json
from lmtrain.data.tokenizer import (
    CONFIG_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from lmtrain.errors import CheckpointError, ConfigError, DataError
from lmtrain.interop import hf_arch
from lmtrain.interop.safetensors_io import SafetensorsReader
from lmtrain.interop.workdir import save_params
from lmtrain.model.config import ModelConfig

HF_SOURCE = "hf_source"
SOURCE_INFO = "source.json"
# A model's own tokenizer files: kept beside an imported model, copied back out by the export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)
SOURCE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(
            f"{model_dir} has no config.json: expected a Hugging Face model directory"
        )
    with open(path) as f:
        return json.load(f)


def _tokenizer_folder(path: str) -> str | None:
    """The folder holding a Hugging Face tokenizer (``tokenizer.json`` / ``tokenizer.model``)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.exists(os.path.join(folder, name)):
            return folder
    return None


def load_hf_tokenizer(model_dir: str, hf: dict, tokenizer: str | None = None) -> Tokenizer:
    """The model's own tokenizer files, or ``tokenizer`` (a path) for a weights-only folder."""
    if tokenizer:
        return _load_tokenizer_path(tokenizer, hf)
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer.from_model_dir(model_dir, hf)
    if os.path.exists(os.path.join(model_dir, "tokenizer.model")):
        return SentencePieceTokenizer.from_file(os.path.join(model_dir, "tokenizer.model"))
    raise DataError(
        f"no tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model next to the "
        "weights; pass --tokenizer PATH (a Hugging Face tokenizer folder, a tokenizer.json or "
        "SentencePiece .model file, or an lmtrain tokenizer folder)"
    )


def _load_tokenizer_path(path: str, hf: dict) -> Tokenizer:
    if not os.path.exists(path):
        raise DataError(f"--tokenizer {path!r} does not exist")
    if os.path.isfile(path) and path.endswith(".model"):
        return SentencePieceTokenizer.from_file(path)
    if os.path.isdir(path) and "kind" in _read_json(os.path.join(path, CONFIG_FILE)):
        return load_tokenizer(path)  # an lmtrain tokenizer folder (same file name as HF's)
    if os.path.isfile(path) and os.path.basename(path) != "tokenizer.json":
        raise DataError(
            f"--tokenizer {path!r}: expected a tokenizer.json or .model file, or a folder"
        )
    folder = _tokenizer_folder(path)
    if folder is None:
        raise DataError(
            f"--tokenizer {path!r} holds no tokenizer.json, tokenizer.model or lmtrain "
            "tokenizer_config"
        )
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return HFTokenizer.from_model_dir(folder, hf)
    return SentencePieceTokenizer.from_file(os.path.join(folder, "tokenizer.model"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(model_dir: str, hf: dict, given: str | None = None) -> str | None:
    """The model's Hugging Face id: ``given``, else the hub cache path
    (``models--ORG--NAME/snapshots/<rev>``), else a non-path ``_name_or_path`` in config.json."""
    if given:
        return given
    parts = os.path.abspath(model_dir).split(os.sep)
    for part in reversed(parts):
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    name = hf.get("_name_or_path")
    if isinstance(name, str) and name and not os.path.isabs(name) and not os.path.exists(name):
        if name.count("/") <= 1 and not name.startswith("."):
            return name
    return None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_tensors(
    reader: SafetensorsReader,
    cfg: ModelConfig,
    model_type: str,
    scratch: str,
    param_dtype: np.dtype,
) -> dict:
    """Every weight, converted one at a time into a memory-mapped ``.npy`` under ``scratch``."""
    rows = hf_arch.tensor_map(cfg, model_type)
    wanted = {name for name, *_ in rows}
    extra = [
        n
        for n in reader.names()
        if n not in wanted
        and not n.endswith(hf_arch.IGNORED_SUFFIXES)
        and not (cfg.tie_embeddings and n == "lm_head.weight")
    ]
    if extra:
        raise CheckpointError(
            f"{len(extra)} tensors in {reader.model_dir} have no place in a {model_type} model "
            f"(e.g. {extra[:3]}); the checkpoint does not match its config.json"
        )
    params: dict = {}
    for i, (name, path, to_lm, _) in enumerate(rows):
        if name not in reader:
            raise CheckpointError(f"tensor {name!r} is missing from {reader.model_dir}")
        value = to_lm(np.asarray(reader.get(name), dtype=np.float32))
        out = np.lib.format.open_memmap(
            os.path.join(scratch, f"{i:06d}.npy"), mode="w+", dtype=param_dtype, shape=value.shape
        )
        out[...] = value
        out.flush()
        del value
        _set(params, path, out)
    return params


def lmtrain_config(
    fields: dict, workdir: str, *, compute_dtype: str, param_dtype: str, seq_len: int
):
    cfg = base_config()
    cfg.model.update(fields)
    cfg.model.update(dtype=compute_dtype, param_dtype=param_dtype)
    cfg.data.dir = os.path.abspath(workdir)
    cfg.data.seq_len = min(seq_len, fields["max_seq_len"])
    cfg.train.samples = 0
    return cfg


def import_hf(
    model_dir: str,
    workdir: str,
    *,
    compute_dtype: str = "bfloat16",
    param_dtype: str = "float32",
    seq_len: int = 2048,
    overwrite: bool = False,
    tokenizer: str | None = None,
    hf_id: str | None = None,
) -> dict:
    """Imports ``model_dir`` into ``workdir``; returns a summary (architecture, params, vocab).

    ``tokenizer``: a tokenizer path for a folder that ships weights only. ``hf_id``: the
    model's Hugging Face id, recorded for exports (derived from a hub cache path otherwise).
    """
    hf = read_hf_config(model_dir)
    model_type = hf_arch.detect_model_type(hf)
    fields = hf_arch.model_fields_from_hf(hf)
    tok = load_hf_tokenizer(model_dir, hf, tokenizer)
    if tok.vocab_size > fields["vocab_size"]:
        raise DataError(
            f"tokenizer in {model_dir} has {tok.vocab_size} tokens but the model only "
            f"{fields['vocab_size']} embeddings"
        )
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        if not overwrite:
            raise CheckpointError(
                f"{workdir} already holds checkpoints; pass --overwrite to replace them"
            )
        shutil.rmtree(os.path.join(workdir, "checkpoints"))
    os.makedirs(workdir, exist_ok=True)
    cfg = lmtrain_config(
        fields, workdir, compute_dtype=compute_dtype, param_dtype=param_dtype, seq_len=seq_len
    )
    model_cfg = ModelConfig.from_config(cfg.model)
    reader = SafetensorsReader(model_dir)
    scratch = os.path.join(workdir, ".import_scratch")
    os.makedirs(scratch, exist_ok=True)
    try:
        params = convert_tensors(reader, model_cfg, model_type, scratch, np.dtype(param_dtype))
        save_params(workdir, params, step=0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tok.save(os.path.join(workdir, "tokenizer"))
    source = os.path.join(workdir, HF_SOURCE)
    os.makedirs(source, exist_ok=True)
    tok_folder = _tokenizer_folder(tokenizer) if tokenizer else None
    for name in SOURCE_FILES:
        for folder in (model_dir, tok_folder):
            if folder and os.path.exists(os.path.join(folder, name)):
                shutil.copyfile(os.path.join(folder, name), os.path.join(source, name))
                break
    info = {
        "model_dir": os.path.abspath(model_dir),
        "hf_id": hub_id(model_dir, hf, hf_id),
        "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
    }
    with open(os.path.join(source, SOURCE_INFO), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(to_json(cfg))
    return {
        "architecture": model_type,
        "params": model_cfg.param_count(),
        "vocab_size": model_cfg.vocab_size,
        "tokenizer": tok.kind,
        "hf_id": info["hf_id"],
        "workdir": os.path.abspath(workdir),
    }
