"""``lmtrain tokenizer train``: a SentencePiece tokenizer from raw files or a prepared dataset.

    lmtrain tokenizer train --input 'corpus/**/*.txt' --out tok/ --vocab-size 8000 --model-type bpe
    lmtrain tokenizer train --input data_out/stdlib --out tok16k/ --vocab-size 16384

``--input`` is either files/directories/globs (``.txt``, ``.md``, ``.html``, ``.jsonl(.gz)``,
``.parquet``, read like a ``files`` data source: UTF-8 repaired, markup converted, text
normalised; ``--segment paragraphs`` cuts big text files into documents of about 2,000
characters) or a directory written by ``lmtrain data prepare``. Training uses the train split
only: raw documents are split by the same content-hash rule as ``data prepare`` (``--validation``
fraction held out, ``--seed``); a prepared dataset's own train split is decoded back to text with
its tokenizer (exact: that tokenizer round-trips). Characters per token on the held-out /
validation documents are printed and saved with the tokenizer in ``tokenizer_report.json``.
The output directory appears only when complete (built in a temporary sibling, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmtrain.data.hashing import hash64
from lmtrain.data.markup import html_to_text, markdown_to_text, sniff_format
from lmtrain.data.normalize import decode_utf8, normalize_text
from lmtrain.data.prepare_config import source
from lmtrain.data.shards import TokenStream
from lmtrain.data.sources import ErrorPolicy, FileSource
from lmtrain.data.split import assign_splits
from lmtrain.data.tokenizer import CHAT_SPECIALS, load_tokenizer, train_sentencepiece
from lmtrain.errors import DataError

REPORT_FILE = "tokenizer_report.json"


def _raw_documents(
    inputs: list[str], text_field: str, on_error: str, segment: str = "file"
) -> Iterator[str]:
    """Cleaned texts of raw input files (decode, markup → text, normalise), in file order."""
    spec = source(
        name="input", paths=tuple(inputs), text_field=text_field, segment=segment
    ).to_dict()
    spec["paths"] = list(spec["paths"])
    src = FileSource(spec, ErrorPolicy(on_error))
    for doc in src:
        text = doc.data
        if isinstance(text, bytes):
            text = decode_utf8(text, "replace").text
        fmt = sniff_format(text) if doc.fmt == "auto" else doc.fmt
        if fmt == "html":
            text = html_to_text(text)
        elif fmt == "markdown":
            text = markdown_to_text(text)
        text, _ = normalize_text(text)
        if text.strip():
            yield text


def _is_prepared(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "manifest.json").is_file() and (p / "train" / "index.json").is_file()


def prepared_split_texts(data_dir: str, split: str) -> Iterator[str]:
    """Documents of a prepared split, decoded from its token stream with the dataset's tokenizer."""
    tok = load_tokenizer(Path(data_dir) / "tokenizer")
    stream = TokenStream(Path(data_dir) / split)
    eos, pos, block = stream.eos_id, 0, 1 << 20
    carry = np.zeros(0, np.int32)
    while pos < stream.num_tokens:
        n = min(block, stream.num_tokens - pos)
        ids = np.concatenate([carry, stream.read(pos, n)])
        pos += n
        ends = np.flatnonzero(ids == eos)
        start = 0
        for e in ends:
            yield tok.decode(ids[start:e].tolist())
            start = e + 1
        carry = ids[start:]
    if carry.size:
        yield tok.decode(carry.tolist())


def _spill_split(texts: Iterator[str], work: Path, validation: float, seed: int) -> dict:
    """Writes train/validation texts (JSONL) by the content-hash split of ``data prepare``."""
    counts = {"train": [0, 0], "validation": [0, 0]}
    fr = (1.0 - validation, validation, 0.0)
    with open(work / "train.jsonl", "w") as tr, open(work / "validation.jsonl", "w") as va:
        for text in texts:
            key = np.array([hash64(" ".join(text.split()))], dtype=np.uint64)
            sid = int(
                assign_splits("hash", fr, content_hashes=key, kept=np.ones(1, bool), seed=seed)[0]
            )
            name = "train" if sid == 0 else "validation"
            (tr if sid == 0 else va).write(json.dumps(text, ensure_ascii=False) + "\n")
            counts[name][0] += 1
            counts[name][1] += len(text)
    return counts


def _read_spill(path: Path, max_chars: int = 0) -> Iterator[str]:
    total = 0
    with open(path) as f:
        for line in f:
            text = json.loads(line)
            yield text
            total += len(text)
            if max_chars and total >= max_chars:
                return


def _spill_prepared(data_dir: str, work: Path) -> dict:
    """Writes a prepared dataset's train/validation documents (JSONL) as the spill files;
    ``{split: [documents, chars]}``."""
    counts = {"train": [0, 0], "validation": [0, 0]}
    for split in counts:
        if not (Path(data_dir) / split / "index.json").is_file():
            continue
        with open(work / f"{split}.jsonl", "w") as f:
            for text in prepared_split_texts(data_dir, split):
                f.write(json.dumps(text, ensure_ascii=False) + "\n")
                counts[split][0] += 1
                counts[split][1] += len(text)
    if not (work / "validation.jsonl").exists():
        (work / "validation.jsonl").write_text("")
    return counts


def _validation_counts(tok, path: Path) -> tuple[int, int]:
    """(characters, tokens) of the validation spill under ``tok``."""
    chars = tokens = 0
    for text in _read_spill(path):
        chars += len(text)
        tokens += len(tok.encode(text))
    return chars, tokens


def _report(tok, settings: dict, specials, source_desc: dict, counts: dict, chars: int,
            tokens: int) -> dict:  # fmt: skip
    """``tokenizer_report.json``: the trained tokenizer, its inputs and its validation ratio."""
    return {
        "kind": tok.kind,
        "model_type": settings["model_type"],
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": settings["requested_vocab_size"],
        "byte_fallback": settings["byte_fallback"],
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "specials": {s: tok.token_id(s) for s in specials if s != "\n"},
        "fingerprint": tok.fingerprint(),
        "source": source_desc,
        "train_documents": counts["train"][0],
        "train_chars": counts["train"][1],
        "validation_documents": counts["validation"][0],
        "validation_chars": chars,
        "validation_tokens": tokens,
        "chars_per_token_validation": round(chars / tokens, 4) if tokens else None,
    }


def train_tokenizer(
    inputs: list[str],
    out_dir: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    specials: tuple[str, ...] = CHAT_SPECIALS,
    validation: float = 0.05,
    seed: int = 0,
    max_train_chars: int = 0,
    text_field: str = "text",
    on_error: str = "stop",
    segment: str = "file",
    overwrite: bool = False,
    num_threads: int = 2,
) -> dict:
    """Trains and saves the tokenizer; returns the report (also in ``tokenizer_report.json``)."""
    if not inputs:
        raise DataError(
            "tokenizer train: --input is empty; give files, globs or a prepared dataset dir"
        )
    if not 0.0 <= validation < 1.0:
        raise DataError(f"tokenizer train: --validation {validation} must be in [0, 1)")
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        work = tmp / "_work"
        work.mkdir()
        if len(inputs) == 1 and _is_prepared(inputs[0]):
            source_desc = {"prepared_dataset": str(Path(inputs[0]).absolute())}
            counts = _spill_prepared(inputs[0], work)
        else:
            source_desc = {
                "files": [str(p) for p in inputs],
                "validation_fraction": validation,
                "seed": seed,
            }
            counts = _spill_split(
                _raw_documents(inputs, text_field, on_error, segment), work, validation, seed
            )
        if counts["train"][0] == 0:
            raise DataError(f"tokenizer train: no training documents in {inputs}; check --input")
        tok = train_sentencepiece(
            _read_spill(work / "train.jsonl", max_train_chars),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            user_specials=tuple(specials),
            seed=seed,
            num_threads=num_threads,
        )
        chars, tokens = _validation_counts(tok, work / "validation.jsonl")
        settings = dict(model_type=model_type, requested_vocab_size=vocab_size,
                        byte_fallback=byte_fallback)  # fmt: skip
        report = _report(tok, settings, specials, source_desc, counts, chars, tokens)
        shutil.rmtree(work)
        tok.save(tmp)
        (tmp / REPORT_FILE).write_text(
            json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def cmd_tokenizer_train(args, overrides) -> None:
    if overrides:
        raise DataError(f"tokenizer train takes no --config.* overrides (got {overrides})")
    report = train_tokenizer(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        byte_fallback=not args.no_byte_fallback,
        specials=tuple(args.specials),
        validation=args.validation,
        seed=args.seed,
        max_train_chars=args.max_train_chars,
        text_field=args.text_field,
        on_error=args.on_error,
        segment=args.segment,
        overwrite=args.overwrite,
        num_threads=args.threads,
    )
    cpt = report["chars_per_token_validation"]
    print(
        f"wrote {args.out}: {report['kind']} {report['model_type']}, vocab {report['vocab_size']}, trained on "
        f"{report['train_documents']} train documents ({report['train_chars']:,} chars); characters per token on "
        f"{report['validation_documents']} validation documents: {cpt if cpt is not None else 'n/a (none held out)'}"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="tokenizer tools")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser(
        "train",
        help="train a SentencePiece tokenizer on the train split of files or a prepared dataset",
    )
    t.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories, globs, or one prepared dataset dir",
    )
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", choices=("bpe", "unigram", "char"), default="bpe")
    t.add_argument("--no-byte-fallback", action="store_true")
    t.add_argument(
        "--specials", nargs="*", default=list(CHAT_SPECIALS), help="control symbols (chat roles)"
    )
    t.add_argument(
        "--validation", type=float, default=0.05, help="held-out fraction of raw documents"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-train-chars", type=int, default=0, help="0: all train text")
    t.add_argument("--text-field", default="text", help="JSONL key / parquet column")
    t.add_argument("--on-error", choices=("stop", "skip"), default="stop")
    t.add_argument(
        "--segment",
        choices=("file", "paragraphs"),
        default="file",
        help="paragraphs: cut text files into ~2,000-character documents (one big file → many)",
    )
    t.add_argument(
        "--threads", type=int, default=2, help="SentencePiece threads (the result depends on it)"
    )
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(fn=cmd_tokenizer_train)
