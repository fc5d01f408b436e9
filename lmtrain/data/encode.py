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
    a text is the concatenation of the encodings of its words (``_WORD``), so each distinct word
    is encoded once. Corpora repeat words (Zipf), so most of SentencePiece's cost is skipped.

    The words are found and looked up without a Python object per word: in the UTF-8 bytes of the
    whole batch a word starts at every newline, at every run of spaces, and at every other byte
    that follows a newline (``_WORD``'s matches tile the text). A word of up to 16 bytes is known
    exactly by its length and first and last 8 bytes, looked up in an open-addressing table in
    numpy; longer words go through a dict. The cached words' ids sit back to back in one array,
    so a batch's ids are gathered at once. The cache is cleared when it holds ``max_words``
    words, which keeps memory flat in corpus size.
    """

    SLOTS_PER_WORD = 2  # table slots per cached word at most: short probe sequences
    GROUP_BYTES = 1 << 18

    def __init__(self, sp, max_words: int = 1 << 18):
        self.sp, self.max_words = sp, max_words
        self._clear()

    def _clear(self) -> None:
        self.count = 0
        self.long: dict[str, int] = {}  # words over 16 bytes
        self.ids = np.zeros(0, np.int64)  # every cached word's ids, back to back
        self.start = np.zeros(0, np.int64)  # where each word's ids start in ``ids``
        self.length = np.zeros(0, np.int64)
        size = 1 << max(4, (self.max_words * self.SLOTS_PER_WORD).bit_length())
        self.mask = np.uint64(size - 1)
        self.t_word = np.full(size, -1, np.int32)  # word number in each slot, -1: empty
        self.t_head = np.zeros(size, np.uint64)
        self.t_tail = np.zeros(size, np.uint64)
        self.t_size = np.zeros(size, np.int16)

    def _add(self, words: list[str], num_threads: int) -> np.ndarray:
        """Encodes and numbers new words; returns their numbers."""
        enc = self.sp.encode(words, num_threads=num_threads)
        lens = np.fromiter(map(len, enc), np.int64, len(enc))
        self.start = np.concatenate([self.start, self.ids.size + np.cumsum(lens) - lens])
        self.length = np.concatenate([self.length, lens])
        flat = np.fromiter(chain.from_iterable(enc), np.int64, int(lens.sum()))
        self.ids = np.concatenate([self.ids, flat])
        self.count += len(words)
        return np.arange(self.count - len(words), self.count)

    def _probe(self, h, head, tail, size) -> tuple[np.ndarray, np.ndarray]:
        """(word number or -1, slot where the probe ended) of each key."""
        slot = h & self.mask
        word = np.full(h.size, -1, np.int64)
        todo = np.arange(h.size)
        while todo.size:
            s = slot[todo]
            w = self.t_word[s]
            hit = (w >= 0) & (self.t_head[s] == head[todo]) & (self.t_tail[s] == tail[todo])
            hit &= self.t_size[s] == size[todo]
            word[todo[hit]] = w[hit]
            todo = todo[(w >= 0) & ~hit]  # another word's slot: try the next one
            slot[todo] = (slot[todo] + np.uint64(1)) & self.mask
        return word, slot

    def encode(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        raw = [t.encode("utf-8", "surrogatepass") for t in texts]
        out, group, size = [], [], 0
        for r in raw:  # groups of about 256 KB: the per-word arrays stay small
            group.append(r)
            size += len(r)
            if size >= self.GROUP_BYTES:
                out += self._encode(group, num_threads)
                group, size = [], 0
        if group:
            out += self._encode(group, num_threads)
        return out

    def _encode(self, raw: list[bytes], num_threads: int) -> list[np.ndarray]:
        if self.count > self.max_words:
            self._clear()
        buf = b"\n".join(raw)  # each "\n" is a word of its own, dropped below
        b = np.frombuffer(buf, np.uint8)
        nl, sp = b == 10, b == 32
        prev_nl = np.concatenate(([True], nl[:-1]))
        prev_sp = np.concatenate(([False], sp[:-1]))
        starts = np.flatnonzero(nl | (sp & ~prev_sp) | (~nl & ~sp & prev_nl))
        ends = np.append(starts[1:], b.size)
        size = ends - starts
        at = np.ndarray((b.size + 1,), "<u8", buffer=buf + bytes(8), strides=(1,))
        keep = _LOW_BYTES[np.minimum(size, 8)]
        head = at[starts] & keep
        tail = at[np.maximum(ends - 8, starts)] & keep
        h = mix64(head ^ mix64(tail + size.astype(np.uint64)))
        short = size <= 16  # head, tail and size give every byte
        word = np.full(starts.size, -1, np.int64)
        si = np.flatnonzero(short)
        found, slot = self._probe(h[si], head[si], tail[si], size[si])
        word[si] = found
        miss = found < 0
        if miss.any():
            mi = si[miss]
            _, first, inverse = np.unique(h[mi], return_index=True, return_inverse=True)
            rep = mi[first][inverse.reshape(-1)]
            same = (head[mi] == head[rep]) & (tail[mi] == tail[rep]) & (size[mi] == size[rep])
            short[mi[~same]] = False  # a 64-bit collision among new words: the dict path
            new = mi[first]
            new = new[short[new]]
            if self.count + new.size > self.t_word.size // self.SLOTS_PER_WORD:
                short[mi] = False  # the table is full until the next clear: the dict path
                new = new[:0]
            texts_new = [buf[s : s + n].decode("utf-8", "surrogatepass") for s, n in zip(starts[new].tolist(), size[new].tolist())]  # fmt: skip
            numbers = self._add(texts_new, num_threads)
            self._insert(h[new], head[new], tail[new], size[new], numbers)
            found, _ = self._probe(h[mi], head[mi], tail[mi], size[mi])
            word[mi] = found
        li = np.flatnonzero(~short | (word < 0))
        if li.size:
            long_words = [buf[s : s + n].decode("utf-8", "surrogatepass") for s, n in zip(starts[li].tolist(), size[li].tolist())]  # fmt: skip
            unseen = list(set(long_words).difference(self.long))
            if unseen:
                self.long.update(zip(unseen, self._add(unseen, num_threads).tolist()))
            word[li] = np.fromiter(map(self.long.__getitem__, long_words), np.int64, li.size)
        lens = self.length[word]
        # The joining newlines: their ids are left out.
        sep_at = np.cumsum([len(r) + 1 for r in raw[:-1]], dtype=np.int64) - 1
        sep = np.searchsorted(starts, sep_at)
        lens[sep] = 0
        ends_tok = np.cumsum(lens)
        within = np.arange(int(ends_tok[-1]) if ends_tok.size else 0) - np.repeat(
            ends_tok - lens, lens
        )
        tokens = self.ids[np.repeat(self.start[word], lens) + within]
        first_word = np.searchsorted(starts, np.concatenate(([0], sep_at + 1)))
        cut = np.concatenate(([0], ends_tok))[np.append(first_word, starts.size)]
        return [tokens[a:b] for a, b in zip(cut[:-1].tolist(), cut[1:].tolist())]

    def _insert(self, h, head, tail, size, numbers) -> None:
        """Puts new keys (not in the table, distinct) into free slots by linear probing."""
        slot = h & self.mask
        todo = np.arange(h.size)
        while todo.size:
            s = slot[todo]
            free = self.t_word[s] < 0
            # one key per free slot this round: the first that wants it
            _, first = np.unique(s, return_index=True)
            take = np.zeros(todo.size, bool)
            take[first] = True
            take &= free
            k, ks = todo[take], s[take]
            self.t_word[ks], self.t_head[ks], self.t_tail[ks], self.t_size[ks] = (
                numbers[k],
                head[k],
                tail[k],
                size[k],
            )
            todo = todo[~take]
            moved = self.t_word[slot[todo]] >= 0  # taken (before or just now): next slot
            slot[todo[moved]] = (slot[todo[moved]] + np.uint64(1)) & self.mask


_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)


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
