"""The one-text-file recipe (nanoGPT's shakespeare_char): split by position, tokenize, write shards.

The first ``1 - val_fraction`` of the characters is the train split and the rest validation, like
nanoGPT; the vocabulary is trained on the train split only (unseen characters map to ``<unk>``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmtrain.data.fetch import missing_hint
from lmtrain.data.shards import sha256_file, write_split
from lmtrain.data.tokenizer import CharTokenizer, load_tokenizer
from lmtrain.errors import DataError


def prepare_text_file(
    path: str, out_dir: str, *, tokenizer: str = "char", val_fraction: float = 0.1
) -> dict:
    src = Path(path)
    if not src.is_file():
        raise DataError(
            f"config.data.path={path!r} does not exist or is not a file" + missing_hint(path)
        )
    digest = sha256_file(src)
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("source_sha256") == digest and manifest.get("tokenizer_spec") == tokenizer:
            return manifest
    try:
        text = src.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 at byte {e.start}; convert it or use `lmtrain data prepare`"
        ) from e
    if not text:
        raise DataError(f"{path} is empty")
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    tok = CharTokenizer.train([train_text]) if tokenizer == "char" else load_tokenizer(tokenizer)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tok.save(tmp / "tokenizer")
    splits = {}
    for name, part in (("train", train_text), ("validation", val_text)):
        splits[name] = write_split(
            tmp / name, [tok.encode(part)], vocab_size=tok.vocab_size, eos_id=tok.eos_id
        )
    manifest = {
        "source": str(src),
        "source_sha256": digest,
        "tokenizer_spec": tokenizer,
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "splits": {
            k: {"num_tokens": v["num_tokens"], "shards": v["shards"]} for k, v in splits.items()
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return manifest
