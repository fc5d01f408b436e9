"""Tokenizers: a character vocabulary, SentencePiece (BPE, unigram, char) and a Hugging Face
``tokenizer.json``, one interface.

A tokenizer directory holds ``tokenizer_config.json`` (kind, special token ids) plus the model:
``vocab.json`` for ``char``, ``tokenizer.model`` for SentencePiece, ``tokenizer.json`` for ``hf``.
A ``tokenizer.model`` shipped with a pre-trained model loads through the same ``load_tokenizer``
call.

The Hugging Face kind lets imported models keep their own vocabulary: the ``tokenizers`` library
runs the exact pre-tokenizer/BPE/normalizer pipeline the model was trained with. Special ids come
from the model's ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``config.json``; a
model without a pad token pads with EOS (padding is masked by segment ids, never attended).
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmtrain.errors import DataError

CONFIG_FILE = "tokenizer_config.json"
DEFAULT_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer(abc.ABC):
    """Common interface; ids of pad/bos/eos/unk are always distinct."""

    kind: str
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text``, with BOS/EOS added when asked."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @abc.abstractmethod
    def token_id(self, piece: str) -> int:
        """Id of a special token such as ``<|assistant|>``; raises if absent."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Writes the files ``load_tokenizer(directory)`` reads back."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 over the saved files: identifies the vocabulary in checkpoints and manifests."""


class CharTokenizer(Tokenizer):
    """One id per character seen in training text, special tokens first."""

    kind = "char"

    def __init__(self, chars: Sequence[str], specials: Sequence[str] = DEFAULT_SPECIALS):
        self.specials = list(specials)
        self.chars = list(chars)
        self.itos = self.specials + self.chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            self.stoi[s] for s in DEFAULT_SPECIALS
        )
        self._char_offset = len(self.specials)

    @classmethod
    def train(cls, texts: Iterable[str], extra_specials: Sequence[str] = ()) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen), list(DEFAULT_SPECIALS) + list(extra_specials))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.stoi.get(c, self.unk_id) for c in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        off = self._char_offset
        return "".join(self.itos[i] for i in ids if off <= i < len(self.itos))

    def token_id(self, piece: str) -> int:
        if piece not in self.stoi:
            raise DataError(f"token {piece!r} is not in the char vocabulary")
        return self.stoi[piece]

    def _payload(self) -> bytes:
        return json.dumps(
            {"specials": self.specials, "chars": self.chars}, ensure_ascii=False
        ).encode()

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_bytes(self._payload())
        _write_config(d, self)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._payload()).hexdigest()


class SentencePieceTokenizer(Tokenizer):
    """Wraps a SentencePiece model (trained here or shipped with a pre-trained model)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        pad = self.sp.pad_id()
        # Many shipped models (Llama 2) have no pad: use unk, which never appears as a target.
        self.pad_id = pad if pad >= 0 else self.unk_id
        if min(self.bos_id, self.eos_id) < 0 or self.bos_id == self.eos_id:
            raise DataError("SentencePiece model must define distinct bos and eos ids")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes())

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what ``save`` writes)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def token_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.unk_id and piece != self.sp.id_to_piece(self.unk_id):
            raise DataError(f"token {piece!r} is not in the SentencePiece vocabulary")
        return i

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(self._proto)
        _write_config(d, self)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()


def _write_config(d: Path, tok: Tokenizer) -> None:
    cfg = {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "fingerprint": tok.fingerprint(),
    }
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))


def train_sentencepiece(
    texts: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    user_specials: Sequence[str] = CHAT_SPECIALS,
    max_sentence_chars: int = 4096,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 2,
) -> SentencePieceTokenizer:
    """Trains SentencePiece on ``texts`` (the train split only) and returns the tokenizer.

    Ids: pad 0, unk 1, bos 2, eos 3 (pad is never eos, so padding is never confused with an end
    of text). Text round-trips exactly: identity normalisation, whitespace kept as is (code and
    verse depend on it), no dummy-prefix space added at the start, ``"\n"`` a user-defined piece
    so paragraph structure survives, bytes for unseen characters (``byte_fallback``). Digits are
    split so numbers tokenize consistently. ``user_specials`` (the chat roles) are *control*
    symbols: they have ids (``token_id``) that code inserts, but ``encode`` never produces them
    from text, so a user who types ``<|assistant|>`` cannot forge a turn.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram", "char", "word"):
        raise DataError(f"tokenizer model_type {model_type!r}: use bpe, unigram or char")

    def sentences():
        for text in texts:
            for start in range(0, len(text), max_sentence_chars):
                piece = text[start : start + max_sentence_chars]
                if piece.strip():
                    yield piece

    spm.set_random_generator_seed(seed)
    out = io.BytesIO()
    controls = [s for s in user_specials if s != "\n"]
    reserved = 4 + 1 + len(controls) + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise DataError(
            f"tokenizer vocab_size {vocab_size} leaves no room for learned pieces: {reserved} ids are "
            f"reserved (pad/unk/bos/eos, newline, {len(controls)} specials"
            f"{', 256 byte-fallback pieces' if byte_fallback else ''}); raise vocab_size"
        )
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=0.9995 if byte_fallback else 1.0,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            user_defined_symbols=["\n"],
            control_symbols=controls,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            hard_vocab_limit=False,  # a small corpus gives fewer pieces instead of failing
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_chars * 4,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}. Try a smaller vocab_size.") from e
    return SentencePieceTokenizer(out.getvalue())


HF_KIND = "hf"


def _hf_token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class HFTokenizer(Tokenizer):
    kind = HF_KIND

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
            text = _hf_token_text(cfg.get(name)) or _hf_token_text(smap.get(name))
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
            "kind": HF_KIND,
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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer directory written by lmtrain, or a shipped ``tokenizer.model`` file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer.from_file(p)
    if not p.exists():
        raise DataError(f"tokenizer not found at {p}: give a tokenizer directory or .model file")
    if (p / CONFIG_FILE).exists():
        cfg = json.loads((p / CONFIG_FILE).read_text())
        if cfg["kind"] == "char":
            payload = json.loads((p / "vocab.json").read_text())
            return CharTokenizer(payload["chars"], payload["specials"])
        if cfg["kind"] == "hf":  # tokenizer.json of an imported Hugging Face model
            return HFTokenizer.load(p)
        return SentencePieceTokenizer.from_file(p / "tokenizer.model")
    if (p / "tokenizer.model").exists():
        return SentencePieceTokenizer.from_file(p / "tokenizer.model")
    raise DataError(
        f"no tokenizer in {p}: expected {CONFIG_FILE} (lmtrain) or tokenizer.model (SentencePiece)"
    )
