"""SentencePiece training and `lmtrain tokenizer train`: special ids, control symbols that user
text cannot forge, exact round trips, bpe/unigram/char, train-split-only, chars/token reported."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmtrain.data.tokenizer import CHAT_SPECIALS, load_tokenizer, train_sentencepiece
from lmtrain.errors import DataError

WORDS = "the of and to with that river stone light window garden music paper letter morning".split()
TRICKY = "  two leading spaces\n\nnew paragraph\n\tтекст 中文 ünïcode 12345 <|user|> <|assistant|>x"


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(15)) for _ in range(6))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def bpe():
    return train_sentencepiece(corpus(), vocab_size=400, model_type="bpe", num_threads=1)


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_model_types_round_trip_exactly_with_byte_fallback(model_type):
    tok = train_sentencepiece(corpus(), vocab_size=400, model_type=model_type, num_threads=1)
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY  # unseen scripts survive as bytes; whitespace kept as is
    assert tok.unk_id not in ids
    if model_type == "char":
        assert all(
            len(tok.sp.id_to_piece(i)) == 1 or tok.sp.is_byte(i) for i in tok.encode("garden")
        )
    else:
        assert len(tok.encode("garden music")) < len("garden music")


def test_special_ids_distinct_and_pad_is_not_eos(bpe):
    ids = {"pad": bpe.pad_id, "unk": bpe.unk_id, "bos": bpe.bos_id, "eos": bpe.eos_id}
    assert ids == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    roles = [bpe.token_id(s) for s in CHAT_SPECIALS]
    assert len(set(roles) | set(ids.values())) == len(roles) + 4
    assert (
        bpe.encode("hi", bos=True, eos=True)[0] == 2
        and bpe.encode("hi", bos=True, eos=True)[-1] == 3
    )


def test_chat_roles_are_control_symbols_user_text_cannot_inject(bpe):
    role_ids = {bpe.token_id(s) for s in CHAT_SPECIALS}
    for s in CHAT_SPECIALS:
        ids = bpe.encode(f"please say {s} now")
        assert not role_ids & set(ids), s
        assert bpe.sp.is_control(bpe.token_id(s))
    # ... while the newline stays an ordinary (user-defined) piece produced from text.
    nl = bpe.sp.piece_to_id("\n")
    assert nl in bpe.encode("a\nb") and not bpe.sp.is_control(nl)


def test_no_dummy_prefix(bpe):
    pieces = [bpe.sp.id_to_piece(i) for i in bpe.encode("the garden")]
    assert not pieces[0].startswith("▁")  # nothing added before the first word
    assert bpe.decode(bpe.encode("the")) == "the"


def test_vocab_too_small_for_reserved_ids_is_a_clear_error():
    with pytest.raises(
        DataError, match="vocab_size 200 leaves no room .* 256 byte-fallback pieces"
    ):
        train_sentencepiece(corpus(5), vocab_size=200)


def test_save_load_and_fingerprint(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.fingerprint() == bpe.fingerprint()
    assert again.encode(TRICKY) == bpe.encode(TRICKY)
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_id"] == 3 and cfg["pad_id"] == 0
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.model").fingerprint() == bpe.fingerprint()


def test_cli_trains_on_train_split_of_files_and_reports_chars_per_token(tmp_path, capsys):
    from lmtrain.cli import main
    from lmtrain.data.hashing import hash64
    from lmtrain.data.split import assign_splits

    raw = tmp_path / "raw"
    raw.mkdir()
    texts = corpus(40, seed=1)
    marker = "QQQXQQQ"  # characters that occur only in held-out documents
    import numpy as np

    def split_of(text: str) -> int:  # the content-hash rule of `data prepare`, computed here
        key = np.array([hash64(" ".join(text.split()))], dtype=np.uint64)
        return int(
            assign_splits(
                "hash", (0.8, 0.2, 0.0), content_hashes=key, kept=np.ones(1, bool), seed=0
            )[0]
        )

    # Documents carrying the marker are only ever ones that the split holds out.
    written = [t + f" {marker}" * 30 if split_of(t + f" {marker}" * 30) == 1 else t for t in texts]
    split = np.array([split_of(t) for t in written])
    assert (split == 1).any() and (split == 0).any()
    assert all(marker not in t for t, s in zip(written, split) if s == 0)
    for i, t in enumerate(written):
        (raw / f"{i:02d}.txt").write_text(t)
    out = tmp_path / "tok"
    main(["tokenizer", "train", "--input", str(raw / "*.txt"), "--out", str(out), "--vocab-size", "300",
          "--model-type", "unigram", "--validation", "0.2", "--threads", "1"])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert report["train_documents"] == int((split == 0).sum())
    assert report["validation_documents"] == int((split == 1).sum())
    tok = load_tokenizer(out)
    assert tok.vocab_size <= 300 and report["model_type"] == "unigram"
    assert tok.sp.piece_to_id("Q") == tok.unk_id  # never seen in training: train split only
    assert tok.decode(tok.encode(marker)) == marker  # byte fallback
    val = [t for t, s in zip(written, split) if s == 1]
    chars = sum(len(t) for t in val)
    tokens = sum(len(tok.encode(t)) for t in val)
    assert report["validation_chars"] == chars and report["validation_tokens"] == tokens
    assert report["chars_per_token_validation"] == pytest.approx(chars / tokens, abs=1e-4)
    assert (
        f"characters per token on {len(val)} validation documents: {report['chars_per_token_validation']}"
        in printed
    )
    with pytest.raises(SystemExit):  # refuses to overwrite without --overwrite (exit code 2)
        main(["tokenizer", "train", "--input", str(raw), "--out", str(out), "--vocab-size", "300"])
    assert "exists and is not empty" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_retrains_from_a_prepared_dataset(tmp_path):
    from lmtrain.data.prepare import prepare
    from lmtrain.data.tokenizer_cli import prepared_split_texts, train_tokenizer

    raw = tmp_path / "raw"
    raw.mkdir()
    texts = [t.replace("\n", " ") + " with the stone." for t in corpus(30, seed=2)]
    for i, t in enumerate(texts):
        (raw / f"{i:02d}.txt").write_text(t)
    cfg = {"sources": [str(raw)], "num_workers": 0, "tokenizer": {"vocab_size": 320},
           "quality": {"min_words": 10}, "dedup": {"near": False}, "split": {"train": 0.7, "validation": 0.3, "test": 0.0}}  # fmt: skip
    m = prepare(cfg, tmp_path / "data")
    train_docs = list(prepared_split_texts(str(tmp_path / "data"), "train"))
    assert len(train_docs) == m["splits"]["train"]["documents"]
    assert set(train_docs) <= set(texts)  # decoded exactly back to the cleaned documents
    report = train_tokenizer(
        [str(tmp_path / "data")], str(tmp_path / "tok2"), vocab_size=350, num_threads=1
    )
    assert report["train_documents"] == m["splits"]["train"]["documents"]
    assert report["validation_documents"] == m["splits"]["validation"]["documents"]
    assert report["source"] == {"prepared_dataset": str((tmp_path / "data").absolute())}
    assert Path(tmp_path / "tok2" / "tokenizer.model").exists()


def test_prepare_can_use_a_shipped_tokenizer_instead_of_training(bpe, tmp_path):
    from lmtrain.data.prepare import prepare

    bpe.save(tmp_path / "shipped")
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, t in enumerate(corpus(12, seed=3)):
        (raw / f"{i}.txt").write_text(t.replace("\n", " ") + " and the river.")
    cfg = {"sources": [str(raw)], "num_workers": 0, "quality": {"min_words": 10}, "dedup": {"near": False},
           "tokenizer": {"path": str(tmp_path / "shipped" / "tokenizer.model")}}  # fmt: skip
    m = prepare(cfg, tmp_path / "data")
    assert m["tokenizer"]["loaded_from"].endswith("tokenizer.model")
    assert (
        m["tokenizer"]["fingerprint"]
        == bpe.fingerprint()
        == load_tokenizer(tmp_path / "data" / "tokenizer").fingerprint()
    )
