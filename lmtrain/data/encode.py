"""Tokenizer for a prepared dataset (trained on the train split only, or loaded) and fast batch
encoding (SentencePiece's C++ thread pool; a numpy lookup table for the char vocabulary)."""

from __future__ import annotations

import numpy as np

from lmtrain.data.hashing import hash64, mix64
from lmtrain.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from lmtrain.errors import DataError


def train_or_load_tokenizer(cfg: dict, texts_for, train_sel: np.ndarray, keys: np.ndarray,
                            chars: np.ndarray, workers: int) -> tuple[Tokenizer, dict]:  # fmt: skip
    """``texts_for(mask)`` yields the texts of the selected documents in corpus order.

    SentencePiece sees at most ``tokenizer.max_train_chars`` characters: a deterministic sample of
    train documents chosen by content hash (independent of the split hash).
    """
    t = cfg["tokenizer"]
    info: dict = {"kind": t["kind"]}
    if t["path"]:
        tok = load_tokenizer(t["path"])
        info.update(kind=tok.kind, loaded_from=str(t["path"]))
    elif t["kind"] == "char":
        tok = CharTokenizer.train(texts_for(train_sel))
        info.update(
            trained_on_documents=int(train_sel.sum()), trained_on_chars=int(chars[train_sel].sum())
        )
    else:
        sel = train_sel
        total = int(chars[train_sel].sum())
        if t["max_train_chars"] and total > t["max_train_chars"]:
            rate = t["max_train_chars"] / total
            salt = np.uint64(hash64(f"tokenizer-sample-{cfg['seed']}"))
            u = (mix64(keys ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            sel = train_sel & (u < rate)
        tok = train_sentencepiece(
            texts_for(sel),
            vocab_size=t["vocab_size"],
            model_type=t["model_type"],
            byte_fallback=t["byte_fallback"],
            user_specials=tuple(t["user_specials"]),
            max_sentence_chars=t["max_sentence_chars"],
            seed=cfg["seed"],
            num_threads=t["num_threads"],
        )
        info.update(model_type=t["model_type"], byte_fallback=t["byte_fallback"],
                    num_threads=t["num_threads"], trained_on_documents=int(sel.sum()),
                    trained_on_chars=int(chars[sel].sum()))  # fmt: skip
    if tok.vocab_size > 2**32:
        raise DataError(f"tokenizer vocab_size {tok.vocab_size} does not fit uint32 shards")
    info.update(vocab_size=tok.vocab_size, fingerprint=tok.fingerprint(), pad_id=tok.pad_id,
                unk_id=tok.unk_id, bos_id=tok.bos_id, eos_id=tok.eos_id)  # fmt: skip
    return tok, info


class _CharTable:
    def __init__(self, tok: CharTokenizer):
        pairs = sorted((ord(c), tok.stoi[c]) for c in tok.chars if len(c) == 1)
        self.cps = np.array([p[0] for p in pairs], dtype=np.uint32)
        self.ids = np.array([p[1] for p in pairs], dtype=np.int64)
        self.unk = tok.unk_id

    def encode(self, text: str) -> np.ndarray:
        a = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        if self.cps.size == 0:
            return np.full(a.size, self.unk, dtype=np.int64)
        pos = np.searchsorted(self.cps, a).clip(max=self.cps.size - 1)
        return np.where(self.cps[pos] == a, self.ids[pos], self.unk)


_TABLES: dict[int, _CharTable] = {}


def encode_batch(tok: Tokenizer, texts: list[str], workers: int = 1) -> list:
    """Token ids (lists or arrays) for each text, no BOS/EOS (the shard writer appends EOS)."""
    if not texts:
        return []
    if isinstance(tok, SentencePieceTokenizer):
        return tok.sp.encode(texts, num_threads=max(workers, 1))
    if isinstance(tok, CharTokenizer):
        table = _TABLES.get(id(tok))
        if table is None:
            table = _TABLES[id(tok)] = _CharTable(tok)
        try:
            return [table.encode(t) for t in texts]
        except UnicodeEncodeError:
            pass
    return [tok.encode(t) for t in texts]
