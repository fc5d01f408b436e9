"""Tokenizer for a prepared dataset (trained on the train split only, or loaded) and fast batch
encoding (SentencePiece's C++ thread pool; a numpy lookup table for the char vocabulary)."""

from __future__ import annotations

import re
from itertools import chain

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


def sample_mask(cfg: dict, train_sel: np.ndarray, keys: np.ndarray, train_chars: int) -> np.ndarray:
    """The train documents SentencePiece sees: all of them, or when they hold more than
    ``tokenizer.max_train_chars`` characters a deterministic sample chosen by content hash
    (independent of the split hash), each document kept with probability max / total."""
    t = cfg["tokenizer"]
    if t["max_train_chars"] and train_chars > t["max_train_chars"]:
        rate = t["max_train_chars"] / train_chars
        salt = np.uint64(hash64(f"tokenizer-sample-{cfg['seed']}"))
        u = (mix64(np.asarray(keys, np.uint64) ^ salt) >> np.uint64(11)).astype(np.float64) / float(
            1 << 53
        )
        return train_sel & (u < rate)
    return train_sel


def train_tokenizer(cfg: dict, texts, documents: int, chars: int) -> tuple[Tokenizer, dict]:
    """Trains the configured tokenizer on ``texts`` (the sample, in corpus order) or loads
    ``tokenizer.path``; ``documents``/``chars`` describe the sample for the manifest."""
    t = cfg["tokenizer"]
    info: dict = {"kind": t["kind"]}
    if t["path"]:
        tok = load_tokenizer(t["path"])
        info.update(kind=tok.kind, loaded_from=str(t["path"]))
    elif t["kind"] == "char":
        tok = CharTokenizer.train(texts)
        info.update(trained_on_documents=int(documents), trained_on_chars=int(chars))
    else:
        tok = train_sentencepiece(
            texts,
            vocab_size=t["vocab_size"],
            model_type=t["model_type"],
            byte_fallback=t["byte_fallback"],
            user_specials=tuple(t["user_specials"]),
            max_sentence_chars=t["max_sentence_chars"],
            seed=cfg["seed"],
            num_threads=t["num_threads"],
        )
        info.update(model_type=t["model_type"], byte_fallback=t["byte_fallback"],
                    num_threads=t["num_threads"], trained_on_documents=int(documents),
                    trained_on_chars=int(chars))  # fmt: skip
        tok.word_separable = True  # trained by train_sentencepiece: see WordMemoEncoder
    if tok.vocab_size > 2**32:
        raise DataError(f"tokenizer vocab_size {tok.vocab_size} does not fit uint32 shards")
    info.update(vocab_size=tok.vocab_size, fingerprint=tok.fingerprint(), pad_id=tok.pad_id,
                unk_id=tok.unk_id, bos_id=tok.bos_id, eos_id=tok.eos_id)  # fmt: skip
    return tok, info


def train_or_load_tokenizer(cfg: dict, texts_for, train_sel: np.ndarray, keys: np.ndarray,
                            chars: np.ndarray, workers: int) -> tuple[Tokenizer, dict]:  # fmt: skip
    """``texts_for(mask)`` yields the texts of the selected documents in corpus order."""
    t = cfg["tokenizer"]
    if t["path"]:
        return train_tokenizer(cfg, (), 0, 0)
    sel = train_sel
    if t["kind"] != "char":
        sel = sample_mask(cfg, train_sel, keys, int(chars[train_sel].sum()))
    return train_tokenizer(cfg, texts_for(sel), int(sel.sum()), int(chars[sel].sum()))


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

# SentencePiece's pre-tokenisation (``SplitIntoWords`` with ``allow_whitespace_only_pieces``)
# starts a word at every space that does not continue a run of spaces; "\n" is a user-defined
# piece that never merges. A word of this regex is therefore never merged with its neighbours.
_WORD = re.compile(r"\n| *[^ \n]+| +")


class WordMemoEncoder:
    """SentencePiece BPE encoding with a per-word cache (the same ids as ``sp.encode``).

    Valid only for models trained by :func:`train_sentencepiece` (identity normalisation, no
    dummy prefix, whitespace kept, BPE never merging across a word start): there the encoding of
    a text is the concatenation of the encodings of its words, so each distinct word is encoded
    once. Corpora repeat words (Zipf), so most of SentencePiece's cost is skipped. The cache maps
    each word to a number and keeps the words' ids back to back in one array, so a batch's ids
    are gathered with a few numpy operations instead of per-word Python work. It is cleared when
    it holds ``max_words`` entries, which keeps memory flat in corpus size.
    """

    def __init__(self, sp, max_words: int = 1 << 18):
        self.sp, self.max_words = sp, max_words
        self._clear()

    def _clear(self) -> None:
        self.index: dict[str, int] = {}
        self.ids = np.zeros(0, np.int64)  # every cached word's ids, back to back
        self.start = np.zeros(0, np.int64)  # where each word's ids start in ``ids``
        self.length = np.zeros(0, np.int64)

    def _add(self, words: list[str], num_threads: int) -> None:
        enc = self.sp.encode(words, num_threads=num_threads)
        lens = np.fromiter(map(len, enc), np.int64, len(enc))
        base = len(self.index)
        self.index.update(zip(words, range(base, base + len(words))))
        self.start = np.concatenate([self.start, self.ids.size + np.cumsum(lens) - lens])
        self.length = np.concatenate([self.length, lens])
        flat = np.fromiter(chain.from_iterable(enc), np.int64, int(lens.sum()))
        self.ids = np.concatenate([self.ids, flat])

    def encode(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        words = [_WORD.findall(t) for t in texts]
        if len(self.index) > self.max_words:
            self._clear()
        flat = list(chain.from_iterable(words))
        idx = list(map(self.index.get, flat))
        if None in idx:
            self._add(list(set(flat).difference(self.index)), num_threads)
            idx = list(map(self.index.__getitem__, flat))
        word = np.array(idx, dtype=np.int64)
        lens = self.length[word]
        ends = np.cumsum(lens)
        within = np.arange(int(ends[-1]) if ends.size else 0) - np.repeat(ends - lens, lens)
        tokens = self.ids[np.repeat(self.start[word], lens) + within]
        bounds = np.zeros(len(words) + 1, np.int64)
        np.cumsum(list(map(len, words)), out=bounds[1:])
        cut = np.concatenate(([0], ends))[bounds]
        return [tokens[a:b] for a, b in zip(cut[:-1].tolist(), cut[1:].tolist())]


_MEMO: dict[int, WordMemoEncoder] = {}


def encode_batch(tok: Tokenizer, texts: list[str], workers: int = 1) -> list:
    """Token ids (lists or arrays) for each text, no BOS/EOS (the shard writer appends EOS)."""
    if not texts:
        return []
    if isinstance(tok, SentencePieceTokenizer):
        if getattr(tok, "word_separable", False):
            memo = _MEMO.get(id(tok))
            if memo is None or memo.sp is not tok.sp:
                _MEMO.clear()
                memo = _MEMO[id(tok)] = WordMemoEncoder(tok.sp)
            return memo.encode(texts, num_threads=max(workers, 1))
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
