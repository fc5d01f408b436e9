"""A Hugging Face ``tokenizer.json`` behind lmtrain's ``Tokenizer`` interface.

Imported models keep their own vocabulary: the ``tokenizers`` library runs the exact
pre-tokenizer/BPE/normalizer pipeline the model was trained with. Special ids come from the
model's ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``config.json``; a model
without a pad token pads with EOS (padding is masked by segment ids, never attended).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from lmtrain.data.tokenizer import CONFIG_FILE, Tokenizer
from lmtrain.errors import DataError

KIND = "hf"


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class HFTokenizer(Tokenizer):
    kind = KIND

    def __init__(
        self,
        tokenizer_json: bytes,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        unk_id: int,
        stop_ids: Sequence[int] = (),
        add_bos: bool = False,
    ):
        from tokenizers import Tokenizer as _Tok

        self._json = tokenizer_json
        self.tok = _Tok.from_str(tokenizer_json.decode("utf-8"))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        if eos_id < 0:
            raise DataError(
                "Hugging Face tokenizer has no EOS token; set eos_token in tokenizer_config.json"
            )
        self.stop_ids = sorted({eos_id, *stop_ids})
        self.add_bos = add_bos and bos_id >= 0

    @classmethod
    def from_model_dir(
        cls, model_dir: str | os.PathLike, hf_config: dict | None = None
    ) -> HFTokenizer:
        """Reads ``tokenizer.json`` and the special tokens shipped next to a model's weights."""
        d = Path(model_dir)
        raw = (d / "tokenizer.json").read_bytes()
        cfg = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        gen = _read_json(d / "generation_config.json")
        hf_config = hf_config or {}
        from tokenizers import Tokenizer as _Tok

        tok = _Tok.from_str(raw.decode("utf-8"))

        def special(name: str, config_key: str) -> int:
            text = _token_text(cfg.get(name)) or _token_text(smap.get(name))
            if text is not None and tok.token_to_id(text) is not None:
                return int(tok.token_to_id(text))
            value = gen.get(config_key, hf_config.get(config_key))
            if isinstance(value, list):
                value = value[0] if value else None
            return int(value) if value is not None else -1

        bos, eos = special("bos_token", "bos_token_id"), special("eos_token", "eos_token_id")
        pad, unk = special("pad_token", "pad_token_id"), special("unk_token", "unk_token_id")
        stops = gen.get("eos_token_id", hf_config.get("eos_token_id"))
        stops = stops if isinstance(stops, list) else [stops] if stops is not None else []
        add_bos = bool(cfg.get("add_bos_token", False))
        if not add_bos and bos >= 0:
            # Fast tokenizers record BOS insertion in the post-processor (Llama 3).
            add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
        return cls(
            raw,
            bos_id=bos,
            eos_id=eos,
            pad_id=pad if pad >= 0 else eos,
            unk_id=unk,
            stop_ids=[int(s) for s in stops],
            add_bos=add_bos,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        d = Path(directory)
        meta = json.loads((d / CONFIG_FILE).read_text())
        return cls(
            (d / "tokenizer.json").read_bytes(),
            bos_id=meta["bos_id"],
            eos_id=meta["eos_id"],
            pad_id=meta["pad_id"],
            unk_id=meta["unk_id"],
            stop_ids=meta.get("stop_ids", ()),
            add_bos=meta.get("add_bos", False),
        )

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        return head + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, piece: str) -> int:
        i = self.tok.token_to_id(piece)
        if i is None:
            raise DataError(f"token {piece!r} is not in the Hugging Face vocabulary")
        return int(i)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_bytes(self._json)
        meta = {
            "kind": KIND,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "stop_ids": self.stop_ids,
            "add_bos": self.add_bos,
            "fingerprint": self.fingerprint(),
        }
        (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def fingerprint(self) -> str:
        return hashlib.sha256(self._json).hexdigest()
