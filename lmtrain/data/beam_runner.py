"""``lmtrain data prepare --runner beam``: the same data stage as an Apache Beam pipeline.

    lmtrain data prepare --config C --out gs://bucket/ds --runner beam \\
        --beam-options "--runner=DataflowRunner --project=P --region=R --temp_location=gs://..."

The per-document stages are :class:`~lmtrain.data.stages.Stages` (the local runner's own), run in
parallel on batches of documents; the global steps are shuffles of small per-document records
(:class:`Rec`: corpus position, id, content hash, LSH band keys, a reference to the text). The
cleaned text, MinHash signatures and token ids never enter a shuffle or a materialised
collection: they go to temporary files under ``<out>/_beam/`` (``beam_spill.py``, through the
filesystem layer) and are read back where a step needs them.

* read + clean: one element per input file (a ``default_corpus``/``tfds`` source is one
  element), so files are read and cleaned in parallel, in batches of ``batch_docs`` /
  ``batch_bytes``; every document carries its corpus position ``(source, file, document)``
  packed into one int, which decides "first" wherever the local runner says so.
* exact dedup: content hashes batched into ``KEY_SHARDS`` arrays by hash, grouped by shard;
  each shard gives (duplicate, earliest document with that hash) pairs; the duplicates are
  dropped with that map as a side input (bound: it holds every exact duplicate).
* near dedup: the kept documents' LSH band keys, batched into ``KEY_SHARDS`` arrays by key,
  grouped by shard; each bucket (same band and key) gives the same candidate pairs as the local
  runner (each member with the bucket's first and with the previous member); distinct pairs
  (``GroupByKey``) are verified with both signatures read back from the spill; confirmed pairs
  are joined into clusters (union-find) on one worker. Bounds: a shard worker holds
  ``documents x bands / KEY_SHARDS`` keys (26 bytes each), the cluster worker every confirmed
  pair.
* split: the same deterministic hash of the content (``position`` splits need a global order
  and are refused); contamination: the evaluation n-grams travel with the cleaning step (its
  ``Stages`` are built once per worker).
* tokenizer: trained on one worker on the same deterministic sample (at most
  ``tokenizer.max_train_chars`` characters, in corpus order).
* tokenisation in parallel batches (token ids spilled); the encoded documents are grouped by
  (split, input file), which gives each file's token ranges and its part of the split's
  ``documents.jsonl``; the files' token totals (one number per file) place every file in its
  split's stream; references to token ranges are grouped by shard and every shard is written by
  its own worker; one worker concatenates each split's ``documents.jsonl`` parts.
* counts: ``CombinePerKey(sum)`` over per-file and per-document counters; ``removed`` records are
  written as ``removed-SSSSS-of-NNNNN.jsonl`` shards (lines sorted within a shard). Progress: the
  Beam counters ``lmtrain/documents_read`` and ``lmtrain/bytes_read`` (live in the Dataflow/Flink
  UI); CPU seconds per step in the ``lmtrain_cpu_us`` counters.

The driver then writes ``tokenizer/``, ``<split>/index.json``, ``manifest.json`` and
``DATASHEET.md`` from the pipeline's ``_beam/summary.json`` and removes ``_beam/``. For the same
input and config the result equals the local runner's: shards, indexes, document lists,
tokenizer and manifest counts byte for byte; removed records as the same set of lines
(``manifest.json`` ``runner`` says so).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from time import thread_time
from typing import NamedTuple

import numpy as np

from lmtrain.data import fs
from lmtrain.data.beam_spill import (
    SPILL_DIR,
    SpillReader,
    SpillWriter,
    pack_order,
    token_file,
    unit_file,
    unit_of,
)
from lmtrain.data.contamination import EvalSets
from lmtrain.data.datasheet import write_datasheet
from lmtrain.data.dedup import band_keys, lsh_params
from lmtrain.data.encode import encode_batch, sample_mask, train_tokenizer
from lmtrain.data.manifest import build_manifest
from lmtrain.data.prepare import commit_output, runner_note
from lmtrain.data.prepare_config import resolve
from lmtrain.data.shards import INDEX_FILE, token_dtype
from lmtrain.data.sources import ErrorPolicy, FileSource, list_files, open_source
from lmtrain.data.split import SPLITS, assign_splits
from lmtrain.data.stages import STAGES, Stages
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import ConfigError, DataError

REMOVED_SHARDS = 4
KEY_SHARDS = 256  # groups of content hashes / LSH band keys: one worker each
SUMMARY = f"{SPILL_DIR}/summary.json"
CPU_COUNTERS = "lmtrain_cpu_us"  # Beam counter namespace: CPU microseconds per step


class Rec(NamedTuple):
    """What the global steps carry per cleaned document (the text stays in the spill)."""

    g: int  # corpus position (beam_spill.pack_order)
    id: str
    source: str
    licence: str
    key: int  # content hash
    chars: int
    time: float
    matches: bytes  # uint64 n-grams shared with the evaluation sets, b"" for none
    off: int  # the text's byte offset in its unit's .txt spill
    size: int  # ... and its length in bytes
    slot: int  # its row in the unit's .sig spill
    bands: bytes  # uint64 LSH band keys, b"" when near dedup is off


def _beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise DataError(
            "--runner beam needs Apache Beam: pip install 'lmtrain[beam]' (apache-beam>=2.77)"
        ) from None
    return beam


def _cpu(step: str, seconds: float) -> None:
    from apache_beam.metrics import Metrics

    if seconds > 0:
        Metrics.counter(CPU_COUNTERS, step).inc(int(seconds * 1e6))


def _units(cfg: dict) -> tuple[list, list]:
    """Read units (one per file; one per non-file source) and the listing errors."""
    units, errors = [], []
    for si, spec in enumerate(cfg["sources"]):
        if spec["kind"] == "files":
            policy = ErrorPolicy(cfg["on_error"])  # 'stop' raises here, before any work
            files = list_files(spec, policy)
            errors += [(("errors", r), n) for r, n in policy.counts.items()]
            errors += [(("example", (0, si, -1, j)), m) for j, m in enumerate(policy.examples)]
            units += [(si, fi, full, shown) for fi, (full, shown) in enumerate(files)]
        else:
            units.append((si, 0, None, None))
    return units, errors


_STAGES: dict = {}  # per worker: Stages built once per (config, eval n-grams) object


def _stages(cfg: dict, eval_ngrams, eval_vocab) -> Stages:
    stages = _STAGES.get((id(cfg), id(eval_ngrams)))
    if stages is None:
        _STAGES.clear()
        stages = _STAGES[(id(cfg), id(eval_ngrams))] = Stages(cfg, eval_ngrams, eval_vocab)
    return stages


def _read_clean(unit, cfg: dict, out: str, lsh: tuple, eval_ngrams, eval_vocab):
    """Reads one unit and runs the shared per-document stages on it in batches: a :class:`Rec`
    per kept document (text and signature spilled), per-unit counts, removed records, errors."""
    from apache_beam import pvalue
    from apache_beam.metrics import Metrics

    t_start = thread_time()
    stages = _stages(cfg, eval_ngrams, eval_vocab)
    cpu0 = Counter(stages.cpu)
    si, fi, full, shown = unit
    spec = cfg["sources"][si]
    policy = ErrorPolicy(cfg["on_error"])
    args = (policy, cfg["normalize"]["invalid_utf8"], cfg["split"]["time_field"])
    if full is None:
        src = open_source(spec, *args)
        docs = iter(src)
    else:
        src = FileSource(spec, *args)
        docs = src.iter_file(full, shown)
    g0 = pack_order(si, fi, 0)
    stats: Counter = Counter()
    counts = {s: Counter() for s in STAGES}
    text_w = SpillWriter(unit_file(out, g0, "txt"))
    sig_w = SpillWriter(unit_file(out, g0, "sig")) if lsh else None
    n = nbytes = 0
    batch, size = [], 0
    # CPU of this step only: the time spent downstream while a batch's outputs are handed on
    # (the runner's fused steps) is left out.
    handed = 0.0
    try:
        for k, d in enumerate(docs):
            n += 1
            nbytes += (
                len(d.data) if isinstance(d.data, bytes) else len(d.data.encode("utf-8", "replace"))
            )
            batch.append((k, d))
            size += len(d.data)
            if len(batch) >= cfg["batch_docs"] or size >= cfg["batch_bytes"]:
                outs = list(
                    _clean_batch(batch, stages, cfg, si, fi, text_w, sig_w, lsh, counts, stats)
                )
                t = thread_time()
                yield from outs
                handed += thread_time() - t
                batch, size = [], 0
        if batch:
            outs = list(_clean_batch(batch, stages, cfg, si, fi, text_w, sig_w, lsh, counts, stats))
            t = thread_time()
            yield from outs
            handed += thread_time() - t
    finally:
        text_w.close()
        if sig_w is not None:
            sig_w.close()
    own = thread_time() - t_start - handed
    Metrics.counter("lmtrain", "documents_read").inc(n)
    Metrics.counter("lmtrain", "bytes_read").inc(nbytes)
    name = spec["name"]
    stats.update({("read_documents", name): n, ("read_bytes", name): nbytes})
    stats.update({("errors", r): c for r, c in policy.counts.items()})
    stats.update({("source_decode", name, r): c for r, c in Counter(src.decode_counts).items()})
    for stage, c in counts.items():
        stats.update({("stage", stage, k): v for k, v in c.items()})
    spent = {k: v - cpu0.get(k, 0.0) for k, v in stages.cpu.items()}
    for k, v in spent.items():
        _cpu(f"clean:{k}", v)
    _cpu("read_and_spill", own - sum(spent.values()))
    for s in stats.items():
        yield pvalue.TaggedOutput("stat", s)
    for j, m in enumerate(policy.examples):
        yield pvalue.TaggedOutput("example", ((0, si, fi, j), m))
    yield pvalue.TaggedOutput("files", ((si, fi), src.files))


def _clean_batch(batch, stages: Stages, cfg, si, fi, text_w, sig_w, lsh, counts, stats):
    from apache_beam import pvalue

    policy = ErrorPolicy(cfg["on_error"])
    removed: list = []
    outs = stages.clean_batch([d for _, d in batch], counts, removed, policy)
    kept = [(k, d, c) for (k, d), c in zip(batch, outs) if c is not None]
    texts, whs, fourth = (
        [c[0] for *_, c in kept],
        [c[1] for *_, c in kept],
        [c[3] for *_, c in kept],
    )
    # clean_batch's fourth item is what features_batch can reuse: the words (text.split()) or,
    # where the batch's content hashes come with the cleaning, the content hash.
    if fourth and isinstance(fourth[0], (int, np.integer)):
        feats = stages.features_batch(texts, whs, keys=fourth)
    else:
        feats = stages.features_batch(texts, whs, fourth)
    keys = None
    slot0 = 0
    if sig_w is not None and kept:
        sigs = np.ascontiguousarray(np.stack([f.sig for f in feats]), dtype=np.uint32)
        slot0 = sig_w.write(sigs.tobytes()) // (sigs.shape[1] * 4)
        keys = band_keys(sigs, *lsh)
    for i, ((k, d, c), f) in enumerate(zip(kept, feats)):
        data = c[0].encode("utf-8", "surrogatepass")
        yield Rec(pack_order(si, fi, k), d.id, d.source, d.licence, int(f.key), f.chars, c[2],
                  f.matches.tobytes() if f.matches.size else b"", text_w.write(data), len(data),
                  slot0 + i, keys[i].tobytes() if keys is not None else b"")  # fmt: skip
    stats[("cleaned_documents",)] += len(kept)
    stats[("cleaned_chars",)] += sum(f.chars for f in feats)
    for r, c in policy.counts.items():
        stats[("errors", r)] += c
    for j, m in enumerate(policy.examples):
        yield pvalue.TaggedOutput("example", ((1, pack_order(si, fi, batch[0][0]), j), m))
    for doc_id, stage, reason in removed:
        yield pvalue.TaggedOutput("removed", _record(doc_id, stage, reason))


def _text(reader: SpillReader, out: str, r: Rec) -> str:
    return reader.read(unit_file(out, r.g, "txt"), r.off, r.size).decode("utf-8", "surrogatepass")


def _record(doc_id, stage, reason, dup_of=None) -> str:
    """A removed.jsonl line, exactly as the local runner writes it."""
    rec = {"id": doc_id, "stage": stage, "reason": reason}
    if dup_of is not None:
        rec["dup_of"] = dup_of
    return json.dumps(rec)


def _by_shard(shard: np.ndarray, *cols: np.ndarray) -> list:
    """(shard, columns of its rows) for every shard present."""
    o = np.argsort(shard, kind="stable")
    cuts = np.flatnonzero(np.diff(shard[o])) + 1
    return [(int(shard[part[0]]), tuple(c[part] for c in cols)) for part in np.split(o, cuts)]


def _key_shards(recs: list):
    """(shard, (content hash, position) arrays) of a batch of records, one item per shard."""
    t0 = thread_time()
    outs = []
    if recs:
        key = np.array([r.key for r in recs], np.uint64)
        g = np.array([r.g for r in recs], np.int64)
        outs = _by_shard((key % np.uint64(KEY_SHARDS)).astype(np.int64), key, g)
    _cpu("exact_dedup", thread_time() - t0)
    yield from outs


def _exact_pairs(kv):
    """(duplicate, earliest document with the same content hash) for one shard's hashes."""
    t0 = thread_time()
    parts = list(kv[1])
    key, g = (np.concatenate([p[i] for p in parts]) for i in range(2))
    o = np.lexsort((g, key))
    key, g = key[o], g[o]
    first = np.concatenate([[True], key[1:] != key[:-1]])
    starts = np.maximum.accumulate(np.where(first, np.arange(g.size), 0))
    outs = list(zip(g[~first].tolist(), g[starts[~first]].tolist()))
    _cpu("exact_dedup", thread_time() - t0)
    yield from outs


def _dup_map(pairs) -> dict:
    """The exact duplicates as one value: {duplicate: representative} and the representatives."""
    dup_of = dict(pairs)
    return {"dup_of": dup_of, "reps": set(dup_of.values())}


def _band_shards(recs: list, bands: int):
    """(shard, (band, key, position, slot) arrays) of a batch of records, one item per shard."""
    t0 = thread_time()
    outs = []
    if recs:
        keys = np.frombuffer(b"".join(r.bands for r in recs), np.uint64)
        band = np.tile(np.arange(bands, dtype=np.int16), len(recs))
        g = np.repeat(np.array([r.g for r in recs], np.int64), bands)
        slot = np.repeat(np.array([r.slot for r in recs], np.int64), bands)
        shard = (keys % np.uint64(KEY_SHARDS)).astype(np.int64)
        outs = _by_shard(shard, band, keys, g, slot)
    _cpu("near_dedup", thread_time() - t0)
    yield from outs


def _bucket_pairs(kv):
    """Candidate pairs of one shard's buckets, as the local runner forms them (each member with
    its bucket's first and with the previous member, in corpus order): ((a, b), (slot a, slot b))."""
    t0 = thread_time()
    parts = list(kv[1])
    band, key, g, slot = (np.concatenate([p[i] for p in parts]) for i in range(4))
    o = np.lexsort((g, key, band))
    band, key, g, slot = band[o], key[o], g[o], slot[o]
    same = (band[1:] == band[:-1]) & (key[1:] == key[:-1])
    outs = []
    if same.any():
        start = np.concatenate([[True], ~same])
        starts = np.maximum.accumulate(np.where(start, np.arange(g.size), 0))
        idx = np.flatnonzero(~start)
        a = np.concatenate([starts[idx], idx - 1])
        b = np.concatenate([idx, idx])
        pairs = np.unique(np.stack([g[a], g[b], slot[a], slot[b]], axis=1), axis=0)
        outs = [((ga, gb), (sa, sb)) for ga, gb, sa, sb in pairs.tolist()]
    _cpu("near_dedup", thread_time() - t0)
    yield from outs


def _verify(pairs: list, out: str, threshold: float, num_perm: int):
    """The distinct candidate pairs of a batch, each verified with both signatures."""
    from apache_beam import pvalue

    t0 = thread_time()
    row = num_perm * 4
    confirmed = []
    with SpillReader() as reader:
        for (ga, gb), slots in pairs:
            sa, sb = next(iter(slots))
            a = np.frombuffer(reader.read(unit_file(out, ga, "sig"), sa * row, row), np.uint32)
            b = np.frombuffer(reader.read(unit_file(out, gb, "sig"), sb * row, row), np.uint32)
            if float((a == b).mean()) >= threshold:
                confirmed.append((ga, gb))
    _cpu("near_dedup", thread_time() - t0)
    yield pvalue.TaggedOutput("candidate", len(pairs))
    yield from confirmed


def _clusters(pairs) -> dict:
    """Union-find over confirmed pairs; every node points at its component's earliest node."""
    t0 = thread_time()
    pairs = sorted(set(pairs))
    parent: dict = {}

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    dup_of = {}
    roots = set()
    for o in parent:
        r = find(o)
        roots.add(r)
        if r != o:
            dup_of[o] = r
    _cpu("near_dedup", thread_time() - t0)
    return {"dup_of": dup_of, "reps": set(dup_of.values()), "confirmed_pairs": len(pairs),
            "clusters": len(roots)}  # fmt: skip


def _drop_dups(r: Rec, dups: dict):
    """Drops duplicates; their ids and their representatives' go to ``ids`` (by representative)
    for the removed records."""
    from apache_beam import pvalue

    rep = dups["dup_of"].get(r.g)
    if rep is not None:
        yield pvalue.TaggedOutput("ids", (rep, (r.g, r.id)))
        return
    if r.g in dups["reps"]:
        yield pvalue.TaggedOutput("ids", (r.g, (r.g, r.id)))
    yield r


def _dup_records(kv, reason: str):
    rep, members = kv
    members = sorted(members)
    rep_id = next(i for g, i in members if g == rep)
    for g, i in members:
        if g != rep:
            yield _record(i, "dedup", reason, rep_id)


def _split_batch(recs: list, cfg: dict):
    """Each document's split (the same hash or time rule as the local runner), train documents
    that share n-grams with the evaluation sets reported (and dropped when so configured)."""
    from apache_beam import pvalue

    t0 = thread_time()
    sp, con = cfg["split"], cfg["contamination"]
    fr = (sp["train"], sp["validation"], sp["test"])
    sids = assign_splits(sp["method"], fr, content_hashes=np.array([d.key for d in recs], np.uint64),
                         kept=np.ones(len(recs), bool), seed=cfg["seed"],
                         times=np.array([d.time for d in recs], np.float64),
                         cutoffs=tuple(sp["time_cutoffs"])).tolist()  # fmt: skip
    outs: list = []
    counts: Counter = Counter()
    for d, sid in zip(recs, sids):
        n = len(d.matches) // 8
        if sid == 0 and n and n >= con["min_matches"]:
            outs.append(pvalue.TaggedOutput("train_match", (d.g, d.matches)))
            if con["drop"]:
                outs.append(pvalue.TaggedOutput(
                    "removed", _record(d.id, "contamination", "overlaps_eval_set")))  # fmt: skip
                counts[("contamination_dropped",)] += 1
                continue
        counts[("split", sid)] += 1
        outs.append((sid, d))
    outs += [pvalue.TaggedOutput("stat", kv) for kv in counts.items()]
    _cpu("split", thread_time() - t0)
    yield from outs


def _contamination(ms, evals, drop: bool):
    matches = {g: np.frombuffer(m, np.uint64) for g, m in ms}
    return evals.report(matches, set(matches) if drop else set()) if evals else []


def _sample_texts(items: list, cfg: dict, train_chars: int, out: str):
    """(position, text, chars) of the batch's train documents in the tokenizer's sample."""
    t0 = thread_time()
    keys = np.array([r.key for _, r in items], np.uint64)
    sel = sample_mask(cfg, np.ones(len(items), bool), keys, train_chars).tolist()
    with SpillReader() as reader:
        rows = [(r.g, _text(reader, out, r), r.chars) for (_, r), s in zip(items, sel) if s]
    _cpu("tokenizer_train", thread_time() - t0)
    yield from rows


def _charset_part(items: list, out: str, want_chars: bool):
    """(characters, documents, chars) of a batch of train documents; the characters are only
    read back for a character-level tokenizer."""
    chars: set = set()
    if want_chars:
        with SpillReader() as reader:
            for _, r in items:
                chars |= set(_text(reader, out, r))
    return (chars, len(items), sum(r.chars for _, r in items))


def _train_tokenizer(samples, cfg: dict, charset) -> dict:
    # SentencePiece trains on its own threads: count the process's CPU for this one-element step.
    t0 = time.process_time()
    t = cfg["tokenizer"]
    if not charset[1]:
        raise DataError(
            "the train split is empty after filtering and dedup; add data or raise config.split.train"
        )
    if t["path"]:
        tok, info = train_tokenizer(cfg, (), 0, 0)
    elif t["kind"] == "char":
        chars, docs, n = charset
        tok, info = train_tokenizer(cfg, ["".join(sorted(chars))], docs, n)
    else:
        samples = sorted(samples)
        tok, info = train_tokenizer(
            cfg, (s[1] for s in samples), len(samples), sum(s[2] for s in samples)
        )
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in Path(d).iterdir()}
    _cpu("tokenizer_train", time.process_time() - t0)
    return {"files": files, "info": info, "separable": bool(getattr(tok, "word_separable", False))}


def _load_tok(payload: dict):
    with tempfile.TemporaryDirectory() as d:
        for name, data in payload["files"].items():
            Path(d, name).write_bytes(base64.b64decode(data))
        tok = load_tokenizer(d)
    if payload["separable"]:
        tok.word_separable = True
    return tok


_TOKS: dict = {}  # per worker: the tokenizer, loaded once per fingerprint


def _encode(items: list, payload: dict, out: str):
    """Encodes a batch of kept documents, spilling their token ids (with the end-of-document
    id) to one file: (split, position, file, token offset, tokens, documents.jsonl line,
    source, licence, chars, token itemsize) per document."""
    from apache_beam import pvalue

    t0 = thread_time()
    fp = payload["info"]["fingerprint"]
    tok = _TOKS.get(fp)
    if tok is None:
        _TOKS.clear()
        tok = _TOKS[fp] = _load_tok(payload)
    dtype = token_dtype(tok.vocab_size)
    with SpillReader() as reader:
        texts = [_text(reader, out, d) for _, d in items]
    rows: list = []
    counts: Counter = Counter()
    path = token_file(out)
    with SpillWriter(path) as w:
        for (sid, d), ids in zip(items, encode_batch(tok, texts, 1)):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= np.iinfo(dtype).max + 1):
                raise DataError(f"token id out of range for {dtype} shards")
            tokens = np.concatenate([ids, [tok.eos_id]]).astype(dtype)
            off = w.write(tokens.tobytes()) // dtype.itemsize
            line = json.dumps({"id": d.id, "source": d.source, "licence": d.licence,
                               "chars": d.chars, "tokens": int(ids.size)}, ensure_ascii=False)  # fmt: skip
            rows.append((sid, d.g, path, off, int(tokens.size), line, d.source, d.licence,
                         d.chars, dtype.itemsize))  # fmt: skip
            counts.update({("split_documents", sid): 1, ("split_chars", sid): d.chars,
                           ("split_tokens", sid): int(ids.size),
                           ("per_source", d.source, d.licence, sid): 1})  # fmt: skip
    _cpu("encode", thread_time() - t0)
    yield from rows
    for kv in counts.items():
        yield pvalue.TaggedOutput("stat", kv)


def _unit_layout(kv, out: str, lists: bool):
    """One read unit's documents of one split, in corpus order: their token ranges relative to
    the unit's start, the unit's token total, and (``document_lists``) its part of the split's
    ``documents.jsonl``: (split, unit, tokens, part file, ranges)."""
    t0 = thread_time()
    (sid, unit), rows = kv
    rows = sorted(rows, key=lambda e: e[1])
    pos, ranges = 0, []
    for e in rows:
        ranges.append((pos, e[2], e[3], e[4], e[9]))  # (start in unit, file, offset, n, itemsize)
        pos += e[4]
    part = ""
    if lists:
        part = f"{out}/{SPILL_DIR}/lists/{sid}-{unit:012d}.jsonl"
        fs.write_text(part, "".join(e[5] + "\n" for e in rows))
    _cpu("write", thread_time() - t0)
    yield (sid, unit, pos, part, ranges)


def _unit_starts(totals) -> dict:
    """Token offset of every (split, unit) in its split's stream: units in corpus order."""
    starts: dict = {}
    for sid in range(len(SPLITS)):
        pos = 0
        for unit, n in sorted((u, n) for s, u, n, _ in totals if s == sid):
            starts[(sid, unit)] = pos
            pos += n
    return starts


def _pieces(u, starts: dict, shard_tokens: int):
    t0 = thread_time()
    sid, unit, _, _, ranges = u
    base = starts[(sid, unit)]
    outs = []
    for rel, path, off, n, itemsize in ranges:
        start, pos = base + rel, 0
        while pos < n:
            shard, at = divmod(start + pos, shard_tokens)
            take = min(n - pos, shard_tokens - at)
            outs.append(((sid, shard), (at, path, off + pos, take, itemsize)))
            pos += take
    _cpu("write", thread_time() - t0)
    yield from outs


def _write_shard(kv, out: str, chunk_tokens: int):
    from array_record.python.array_record_module import ArrayRecordWriter

    t0 = thread_time()
    (sid, shard), pieces = kv
    pieces = sorted(pieces)
    dtype = np.dtype(f"<u{pieces[0][4]}")
    with SpillReader() as reader:
        stream = np.concatenate([
            np.frombuffer(reader.read(path, off * dtype.itemsize, take * dtype.itemsize), dtype)
            for _, path, off, take, _ in pieces
        ])  # fmt: skip
    name = f"shard-{shard:05d}.array_record"
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, name)
        w = ArrayRecordWriter(local, "group_size:1")
        records = 0
        for s in range(0, stream.size, chunk_tokens):
            w.write(np.ascontiguousarray(stream[s : s + chunk_tokens]).tobytes())
            records += 1
        w.close()
        with open(local, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        fs.upload_file(local, f"{out}/{SPLITS[sid]}/{name}")
    _cpu("write", thread_time() - t0)
    yield (sid, shard, {"file": name, "num_records": records, "num_tokens": int(stream.size),
                        "sha256": sha})  # fmt: skip


def _write_removed(kv, out: str):
    t0 = thread_time()
    shard, lines = kv
    fs.write_text(
        f"{out}/removed-{shard:05d}-of-{REMOVED_SHARDS:05d}.jsonl",
        "".join(line + "\n" for line in sorted(lines)),
    )
    _cpu("write", thread_time() - t0)
    yield shard


def _write_lists(totals, out: str):
    """Each split's ``documents.jsonl``: the units' parts concatenated in corpus order."""
    t0 = thread_time()
    for sid, s in enumerate(SPLITS):
        with SpillWriter(f"{out}/{s}/documents.jsonl") as w:
            for _, part in sorted((u, part) for k, u, _, part in totals if k == sid):
                with fs.open_read(part) as f:
                    while chunk := f.read(1 << 22):
                        w.write(chunk)
    _cpu("write", thread_time() - t0)
    yield len(totals)


def build_pipeline(p, cfg: dict, out: str, evals: EvalSets | None):
    """Adds the data stage to the Beam pipeline ``p``, writing under ``out``."""
    beam = _beam()
    from apache_beam.pvalue import AsList, AsSingleton

    d = cfg["dedup"]
    units, list_errors = _units(cfg)
    bands, rows = (d["bands"], d["rows"]) if d["bands"] and d["rows"] else lsh_params(
        d["threshold"], d["num_perm"])  # fmt: skip
    lsh = (bands, rows) if d["near"] else ()
    cleaned = (
        p
        | "Units" >> beam.Create(units)
        | "SpreadUnits" >> beam.Reshuffle()
        | "ReadClean" >> beam.FlatMap(_read_clean, cfg, out, lsh, *((evals.all_ngrams, evals.vocab) if evals else (None, None)))
        .with_outputs("stat", "example", "removed", "files", main="docs")
    )  # fmt: skip
    stat_parts = [cleaned.stat, p | "ListErrors" >> beam.Create(
        [e for e in list_errors if e[0][0] == "errors"])]  # fmt: skip
    example_parts = [cleaned.example, p | "ListExamples" >> beam.Create(
        [(k[1], m) for k, m in list_errors if k[0] == "example"])]  # fmt: skip
    removed_parts = [cleaned.removed]
    docs = cleaned.docs
    if d["exact"]:
        exact = (
            docs
            | "HashBatches" >> beam.BatchElements(min_batch_size=1024, max_batch_size=16384)
            | "Hashes" >> beam.FlatMap(_key_shards)
            | "GroupHashes" >> beam.GroupByKey()
            | "ExactPairs" >> beam.FlatMap(_exact_pairs)
            | "ExactList" >> beam.combiners.ToList()
            | "ExactMap" >> beam.Map(_dup_map)
        )
        ex = docs | "DropExact" >> beam.FlatMap(_drop_dups, AsSingleton(exact)).with_outputs(
            "ids", main="docs")  # fmt: skip
        docs = ex.docs
        removed_parts.append(ex.ids | "ByFirst" >> beam.GroupByKey()
                             | "ExactRecords" >> beam.FlatMap(_dup_records, "exact_duplicate"))  # fmt: skip
        stat_parts.append(exact | "ExactCount" >> beam.Map(lambda m: (("exact_duplicates",), len(m["dup_of"]))))  # fmt: skip
    docs, near, candidates = _near_dedup(p, docs, cfg, out, bands, stat_parts, removed_parts)
    split = (
        docs
        | "SplitBatches" >> beam.BatchElements(min_batch_size=1024, max_batch_size=16384)
        | "Split" >> beam.FlatMap(_split_batch, cfg).with_outputs(
            "train_match", "removed", "stat", main="docs")
    )  # fmt: skip
    stat_parts.append(split.stat)
    removed_parts.append(split.removed)
    drop = cfg["contamination"]["drop"]
    contamination = (
        split.train_match
        | "Matches" >> beam.combiners.ToList()
        | "Report" >> beam.Map(_contamination, evals, drop)
    )
    kept = split.docs
    train = kept | "Train" >> beam.Filter(lambda x: x[0] == 0)
    train_chars = train | "TrainChars" >> beam.Map(lambda x: x[1].chars) | "SumChars" >> beam.CombineGlobally(sum)  # fmt: skip
    tok, enc, shards = _encode_and_shard(kept, train, train_chars, cfg, out)
    stat_parts.append(enc.stat)
    (tuple(removed_parts) | "AllRemoved" >> beam.Flatten()
     | "RemovedShard" >> beam.Map(lambda line: (zlib.crc32(line.encode()) % REMOVED_SHARDS, line))
     | "GroupRemoved" >> beam.GroupByKey()
     | "WriteRemoved" >> beam.FlatMap(_write_removed, out))  # fmt: skip
    stats = tuple(stat_parts) | "AllStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum)
    examples = tuple(example_parts) | "AllExamples" >> beam.Flatten() | beam.combiners.Top.Smallest(20)  # fmt: skip
    files = cleaned.files
    (p | "One" >> beam.Create([None]) | "Summary" >> beam.FlatMap(
        _summary, out, AsList(stats), AsSingleton(examples), AsList(files), AsSingleton(near),
        AsSingleton(candidates), AsSingleton(contamination), AsSingleton(tok), AsList(shards)))  # fmt: skip


def _near_dedup(p, docs, cfg: dict, out: str, bands: int, stat_parts: list, removed_parts: list):
    """Near-duplicate removal (MinHash LSH buckets, confirmed pairs, clusters): (docs kept,
    the clusters as one value, the count of candidate pairs); stats and removed records are
    appended to the lists."""
    beam = _beam()
    from apache_beam.pvalue import AsSingleton

    d = cfg["dedup"]
    empty_near = {"dup_of": {}, "reps": set(), "confirmed_pairs": 0, "clusters": 0}
    if not d["near"]:
        near = p | "NoNear" >> beam.Create([empty_near])
        candidates = p | "NoCandidates" >> beam.Create([0])
        return docs, near, candidates
    checked = (
        docs
        | "BandBatches" >> beam.BatchElements(min_batch_size=1024, max_batch_size=16384)
        | "Bands" >> beam.FlatMap(_band_shards, bands)
        | "GroupBands" >> beam.GroupByKey()
        | "Pairs" >> beam.FlatMap(_bucket_pairs)
        | "DistinctPairs" >> beam.GroupByKey()
        | "PairBatches" >> beam.BatchElements(min_batch_size=256, max_batch_size=4096)
        | "Verify" >> beam.FlatMap(_verify, out, d["threshold"], d["num_perm"])
        .with_outputs("candidate", main="pairs")
    )  # fmt: skip
    near = checked.pairs | "Clusters" >> beam.combiners.ToList() | beam.Map(_clusters)
    candidates = checked.candidate | "CountCandidates" >> beam.CombineGlobally(sum)
    dropped = docs | "DropNear" >> beam.FlatMap(_drop_dups, AsSingleton(near)).with_outputs(
        "ids", main="docs")  # fmt: skip
    removed_parts.append(
        dropped.ids
        | "ByRepresentative" >> beam.GroupByKey()
        | "NearRecords" >> beam.FlatMap(_dup_records, "near_duplicate")
    )
    stat_parts.append(near | "NearCount" >> beam.Map(lambda n: (("near_duplicates",), len(n["dup_of"]))))  # fmt: skip
    return dropped.docs, near, candidates


def _encode_and_shard(kept, train, train_chars, cfg: dict, out: str):
    """The tokenizer trained on a sample of the train split, every kept document encoded, and
    the token shards written: (tokenizer, encoded documents, shards)."""
    beam = _beam()
    from apache_beam.pvalue import AsSingleton

    samples = (
        train
        | "SampleBatches" >> beam.BatchElements(min_batch_size=64, max_batch_size=1024)
        | "SampleTexts" >> beam.FlatMap(_sample_texts, cfg, AsSingleton(train_chars), out)
        | "SampleList" >> beam.combiners.ToList()
    )
    want_chars = cfg["tokenizer"]["kind"] == "char" and not cfg["tokenizer"]["path"]
    charset = (
        train
        | "TrainBatches" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        | "Chars" >> beam.Map(_charset_part, out, want_chars)
        | "Charset" >> beam.CombineGlobally(_union)
    )
    tok = samples | "Tokenizer" >> beam.Map(_train_tokenizer, cfg, AsSingleton(charset))
    enc = (
        kept
        | "EncodeBatches" >> beam.BatchElements(min_batch_size=64, max_batch_size=1024)
        | "Encode" >> beam.FlatMap(_encode, AsSingleton(tok), out).with_outputs("stat", main="rows")
    )
    shard_tokens = max(1, cfg["output"]["shard_tokens"] // cfg["output"]["chunk_tokens"]) * cfg[
        "output"]["chunk_tokens"]  # fmt: skip
    units = (
        enc.rows
        | "ByUnit" >> beam.Map(lambda e: ((e[0], unit_of(e[1])), e))
        | "GroupUnit" >> beam.GroupByKey()
        | "UnitLayout" >> beam.FlatMap(_unit_layout, out, cfg["output"]["document_lists"])
    )
    totals = units | "Totals" >> beam.Map(lambda u: u[:4]) | "TotalList" >> beam.combiners.ToList()
    if cfg["output"]["document_lists"]:
        _ = totals | "WriteLists" >> beam.FlatMap(_write_lists, out)
    shards = (
        units
        | "Pieces"
        >> beam.FlatMap(
            _pieces, AsSingleton(totals | "Starts" >> beam.Map(_unit_starts)), shard_tokens
        )
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShard" >> beam.FlatMap(_write_shard, out, cfg["output"]["chunk_tokens"])
    )
    return tok, enc, shards


def _union(xs):
    chars, docs, n = set(), 0, 0
    for c, k, m in xs:
        chars |= set(c)
        docs += k
        n += m
    return (chars, docs, n)


def _summary(_, out, stats, examples, files, near, candidates, contamination, tok, shards):
    summary = {
        "stats": [[list(k), v] for k, v in stats],
        "examples": [m for _, m in sorted(examples)][:20],
        "files": [[list(k), v] for k, v in sorted(files)],
        "near": {
            "confirmed_pairs": near["confirmed_pairs"],
            "clusters": near["clusters"],
            "candidate_pairs": candidates,
        },  # fmt: skip
        "contamination": contamination,
        "tokenizer": tok,
        "shards": sorted([sid, shard, info] for sid, shard, info in shards),
    }
    fs.write_text(f"{out}/{SUMMARY}", json.dumps(summary))
    yield 1


class _Shim:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def prepare_beam(
    config,
    out_dir: str,
    overwrite: bool = False,
    beam_options: str = "",
    stats: dict | None = None,
) -> dict:
    """Runs the Beam pipeline, then writes the tokenizer, indexes and manifest; returns it.

    ``stats``, when given, receives the CPU seconds per step from the pipeline's counters
    (``cpu_s``, and ``clean_cpu_s`` per cleaning stage) where the runner reports them."""
    _beam()
    cfg = resolve(config)
    if cfg["split"]["method"] == "position":
        raise ConfigError(
            "split.method='position' needs the whole corpus in order on one machine; "
            "use split.method='hash' or 'time' with --runner beam, or the local runner"
        )
    fs.check_empty(out_dir, overwrite)
    remote = fs.is_remote(out_dir)
    if remote:
        stage = str(out_dir).rstrip("/")
        if overwrite and fs.as_path(stage).exists():
            fs.as_path(stage).rmtree()
    else:
        out = Path(out_dir).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        t0 = time.monotonic()
        cpu = _run(cfg, stage, beam_options)
        t1 = thread_time()
        manifest = _finish(cfg, stage, json.loads(fs.read_bytes(f"{stage}/{SUMMARY}")))
        fs.as_path(f"{stage}/{SPILL_DIR}").rmtree()
        fs.write_text(f"{stage}/manifest.json",
                      json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")  # fmt: skip
        if not remote:
            commit_output(Path(stage), out)
        if stats is not None and cpu:
            stats["cpu_s"] = {k: v for k, v in cpu.items() if not k.startswith("clean:")}
            stats["cpu_s"]["clean_workers"] = sum(
                v for k, v in cpu.items() if k.startswith("clean:")
            )
            stats["cpu_s"]["driver_finish"] = thread_time() - t1
            stats["clean_cpu_s"] = {k[6:]: v for k, v in cpu.items() if k.startswith("clean:")}
        print(f"[data] beam pipeline finished in {time.monotonic() - t0:.1f} s")
    except BaseException:
        if not remote:
            shutil.rmtree(stage, ignore_errors=True)
        elif fs.as_path(f"{stage}/{SPILL_DIR}").exists():  # keep no temporary files behind
            fs.as_path(f"{stage}/{SPILL_DIR}").rmtree()
        raise
    return manifest


def _run(cfg: dict, stage: str, beam_options: str) -> dict:
    """Builds and runs the pipeline; CPU seconds per step from its counters ({} if the runner
    reports none)."""
    beam = _beam()
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    con = cfg["contamination"]
    evals = EvalSets(con["eval_sets"], con["ngram"]) if con["eval_sets"] else None
    args = shlex.split(beam_options or "")
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
    try:
        p = beam.Pipeline(options=PipelineOptions(args))
        build_pipeline(p, cfg, stage, evals)
        result = p.run()
        result.wait_until_finish()
    except DataError:
        raise
    except Exception as e:  # Beam wraps worker exceptions; keep our one-line messages
        msg = str(e)
        if "DataError" in msg or "lmtrain.errors" in msg:
            raise DataError(msg.strip().splitlines()[-1][:2000]) from None
        raise
    cpu: Counter = Counter()
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(CPU_COUNTERS))["counters"]
    except Exception:  # not every runner reports metrics; the counts do not depend on them
        return {}
    for c in counters:
        cpu[c.key.metric.name] += (c.committed if c.committed is not None else c.attempted) / 1e6
    return dict(cpu)


def _sources_read(cfg: dict, summary: dict, stats: Counter):
    """The sources as the manifest describes them (their files and decode counts), and the
    documents and bytes read per source, from the pipeline's summary."""
    files: dict = {}
    for (si, _fi), entries in summary["files"]:
        files.setdefault(si, []).extend(entries)
    sources, docs_read, bytes_read = [], Counter(), Counter()
    for si, spec in enumerate(cfg["sources"]):
        src = open_source(spec, ErrorPolicy("skip"), cfg["normalize"]["invalid_utf8"], "")
        src.files = files.get(si, [])
        src.decode_counts = Counter({k[2]: n for k, n in stats.items()
                                     if k[0] == "source_decode" and k[1] == spec["name"]})  # fmt: skip
        sources.append(src)
        docs_read[spec["name"]] = stats[("read_documents", spec["name"])]
        bytes_read[spec["name"]] = stats[("read_bytes", spec["name"])]
    return sources, docs_read, bytes_read


def _finish(cfg: dict, stage: str, summary: dict) -> dict:
    """Tokenizer, split indexes, datasheet and manifest from the pipeline's summary."""
    stats: Counter = Counter()
    for k, v in summary["stats"]:
        stats[tuple(tuple(x) if isinstance(x, list) else x for x in k)] += v
    tok = _load_tok(summary["tokenizer"])
    tok_info = dict(summary["tokenizer"]["info"])
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        for f in Path(d).iterdir():
            fs.upload_file(f, f"{stage}/tokenizer/{f.name}")
    dtype = token_dtype(tok.vocab_size)
    indexes, per_split = {}, {}
    for sid, s in enumerate(SPLITS):
        per_split[s] = Counter(documents=stats[("split_documents", sid)],
                               chars=stats[("split_chars", sid)], tokens=stats[("split_tokens", sid)])  # fmt: skip
        shards = [info for k, _, info in summary["shards"] if k == sid]
        indexes[s] = {"format": "lmtrain-token-stream-v1", "dtype": dtype.str,
                      "chunk_tokens": cfg["output"]["chunk_tokens"], "eos_id": int(tok.eos_id),
                      "num_documents": int(per_split[s]["documents"]),
                      "num_tokens": int(sum(x["num_tokens"] for x in shards)), "shards": shards}  # fmt: skip
        fs.write_text(f"{stage}/{s}/{INDEX_FILE}", json.dumps(indexes[s], indent=2, sort_keys=True))
        if (
            cfg["output"]["document_lists"]
            and not fs.as_path(f"{stage}/{s}/documents.jsonl").exists()
        ):
            fs.write_text(f"{stage}/{s}/documents.jsonl", "")
    for k in range(REMOVED_SHARDS):  # a shard with no record still exists, empty
        name = f"{stage}/removed-{k:05d}-of-{REMOVED_SHARDS:05d}.jsonl"
        if not fs.as_path(name).exists():
            fs.write_text(name, "")
    v = per_split["validation"]
    tok_info["chars_per_token_validation"] = round(v["chars"] / v["tokens"], 4) if v["tokens"] else None  # fmt: skip
    sources, docs_read, bytes_read = _sources_read(cfg, summary, stats)
    counts = {s: Counter() for s in STAGES}
    errors = Counter()
    per_source = Counter()
    for k, n in stats.items():
        if k[0] == "stage":
            counts[k[1]][k[2]] += n
        elif k[0] == "errors":
            errors[k[1]] += n
        elif k[0] == "per_source":
            per_source[(k[1], k[2], SPLITS[k[3]])] += n
    for c in counts.values():  # zero counts never reach the local runner's Counters either
        for key in [key for key, n in c.items() if not n]:
            del c[key]
    scan = _Shim(counts=counts, errors=errors, error_examples=summary["examples"],
                 n=stats[("cleaned_documents",)], chars=stats[("cleaned_chars",)])  # fmt: skip
    if sum(docs_read.values()) == 0:
        raise DataError(
            f"empty corpus: the sources {[s['name'] for s in cfg['sources']]} gave no documents; check config.sources paths"
        )
    d = cfg["dedup"]
    bands, rows = (d["bands"], d["rows"]) if d["bands"] and d["rows"] else lsh_params(
        d["threshold"], d["num_perm"])  # fmt: skip
    lsh = {"bands": bands, "rows": rows}
    if d["near"]:
        lsh.update(summary["near"])
    split_counts = {s: stats[("split", i)] for i, s in enumerate(SPLITS)}
    manifest = build_manifest(cfg, sources, docs_read, bytes_read, scan, stats[("exact_duplicates",)],
                              stats[("near_duplicates",)], lsh, split_counts, summary["contamination"],
                              range(stats[("contamination_dropped",)]), tok, tok_info, indexes,
                              per_split, per_source)  # fmt: skip
    manifest["runner"] = runner_note("beam")
    with tempfile.TemporaryDirectory() as d:
        write_datasheet(Path(d) / "DATASHEET.md", manifest)
        fs.upload_file(Path(d) / "DATASHEET.md", f"{stage}/DATASHEET.md")
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return manifest
