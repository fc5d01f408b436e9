"""A SentencePiece model → a ``tokenizer.json`` that tokenizes exactly as SentencePiece does.

Why not let ``transformers`` convert ``tokenizer.model`` itself: its Llama converter assumes
Llama's settings (a "▁" dummy prefix on every text, whitespace collapsed), so a model trained
with ``add_dummy_prefix=False`` and whitespace kept (lmtrain's defaults, which code needs)
encodes differently (``"def main("`` gains a prefix piece) and decodes ``"    return x\\n"``
with a space missing. Here every setting is read from the model itself:

- normaliser: optional whitespace collapsing (``remove_extra_whitespaces``), the dummy prefix
  only if the model has one, spaces → "▁" (``escape_whitespaces``);
- pre-tokeniser: SentencePiece's word split (a word starts at a "▁" that follows a non-"▁";
  with ``allow_whitespace_only_pieces`` a run of "▁" stays with the word after it);
- model: BPE (merges derived from the pieces in score order, control/byte/user pieces never
  merged into) or Unigram (pieces with their scores) for ``unigram`` and ``char``, with byte
  fallback when the model has it;
- user-defined pieces (lmtrain's ``"\\n"``) are added tokens matched before the model, as
  SentencePiece does; control pieces (chat roles) stay ids only, never produced from text.

The ModelProto is read with a few lines of protobuf wire decoding, so this needs neither the
``protobuf`` package nor a matching generated module.
"""

from __future__ import annotations

import json
import struct

from lmtrain.errors import ConfigError

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) for every field of one message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ConfigError(f"SentencePiece model: unsupported protobuf wire type {wire}")
        yield num, wire, value


def parse_model(proto: bytes) -> dict:
    """Pieces (text, score, type) and the trainer/normaliser settings that shape encoding."""
    pieces, trainer, normalizer = [], {}, {}
    for num, _, value in _fields(proto):
        if num == 1:
            piece = {"piece": "", "score": 0.0, "type": NORMAL}
            for n, _, v in _fields(value):
                if n == 1:
                    piece["piece"] = v.decode("utf-8")
                elif n == 2:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif num == 2:
            trainer = {n: v for n, _, v in _fields(value)}
        elif num == 3:
            normalizer = {n: v for n, _, v in _fields(value)}
    name = normalizer.get(1, b"nmt_nfkc")
    return {
        "pieces": pieces,
        "model_type": MODEL_TYPES.get(trainer.get(3, 1), "unigram"),
        "byte_fallback": bool(trainer.get(35, 0)),
        "treat_whitespace_as_suffix": bool(trainer.get(24, 0)),
        "allow_whitespace_only_pieces": bool(trainer.get(26, 0)),
        "split_by_whitespace": bool(trainer.get(22, 1)),
        "normalization": name.decode() if isinstance(name, bytes) else str(name),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
        "has_precompiled_charsmap": bool(normalizer.get(2)),
    }


def unsupported_reason(spec: dict) -> str | None:
    if spec["model_type"] == "word":
        return "word models are not supported"
    if spec["treat_whitespace_as_suffix"]:
        return "treat_whitespace_as_suffix is not supported"
    if spec["normalization"] not in ("identity", "") and spec["has_precompiled_charsmap"]:
        return f"normalization rule {spec['normalization']!r} (only 'identity' converts exactly)"
    return None


def _bpe_merges(pieces: list[dict]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two vocabulary pieces, highest-scoring piece first:
    SentencePiece BPE merges the pair whose result scores highest, HF BPE the lowest rank."""
    vocab = {p["piece"]: i for i, p in enumerate(pieces) if p["type"] == NORMAL}
    ranked = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-pieces[pid]["score"], pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_json(proto: bytes) -> str:
    """The ``tokenizers`` JSON for a SentencePiece model (raises if it cannot be exact)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    spec = parse_model(proto)
    why = unsupported_reason(spec)
    if why:
        raise ConfigError(f"cannot convert this SentencePiece model to tokenizer.json: {why}")
    pieces = spec["pieces"]
    unk = next((i for i, p in enumerate(pieces) if p["type"] == UNKNOWN), None)
    if spec["model_type"] == "bpe":
        vocab = {p["piece"]: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _bpe_merges(pieces),
            unk_token=pieces[unk]["piece"] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=spec["byte_fallback"],
        )
    else:  # unigram and char: Viterbi over the pieces' scores (char pieces are single chars)
        # Only normal pieces compete in SentencePiece's lattice: control, user-defined, unused
        # and byte pieces get a score no path would choose (bytes are still found by name for
        # the byte fallback).
        model = models.Unigram(
            [(p["piece"], p["score"] if p["type"] == NORMAL else -1e9) for p in pieces],
            unk_id=unk,
            byte_fallback=spec["byte_fallback"],
        )
    t = HFTok(model)
    norm = []
    if spec["remove_extra_whitespaces"]:
        norm += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        norm.append(normalizers.Prepend(SPACE if spec["escape_whitespaces"] else " "))
    if spec["escape_whitespaces"]:
        norm.append(normalizers.Replace(" ", SPACE))
    if norm:
        t.normalizer = normalizers.Sequence(norm)
    if spec["split_by_whitespace"]:
        # SentencePiece's SplitIntoWords: a word begins at "▁" unless it continues a "▁" run
        # (allow_whitespace_only_pieces), so a run stays with the word that follows it.
        word = (
            f"{SPACE}*[^{SPACE}]+|{SPACE}+"
            if spec["allow_whitespace_only_pieces"]
            else (f"{SPACE}?[^{SPACE}]+|{SPACE}")
        )
        t.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    dec = [decoders.Replace(SPACE, " ")] if spec["escape_whitespaces"] else []
    if spec["byte_fallback"]:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(" ", 1, 0))
    t.decoder = decoders.Sequence(dec)
    t.add_tokens(
        [
            AddedToken(p["piece"], special=False, normalized=False)
            for p in pieces
            if p["type"] == USER_DEFINED
        ]
    )
    specials = [p["piece"] for p in pieces if p["type"] in (CONTROL, UNKNOWN)]
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return json.dumps(json.loads(t.to_str()), ensure_ascii=False)
