"""``lmtrain data prepare --runner beam``: the same data stage as an Apache Beam pipeline.

    lmtrain data prepare --config C --out gs://bucket/ds --runner beam \\
        --beam-options "--runner=DataflowRunner --project=P --region=R --temp_location=gs://..."

The per-document stages are :class:`~lmtrain.data.stages.Stages` (the local runner's own), run in
parallel ``DoFn``s; the global steps are shuffles:

* read: one element per input file (a ``default_corpus``/``tfds`` source is one element), so
  files are read in parallel; every document carries its corpus-order key
  ``(source, file, document)``, which decides "first" wherever the local runner says so.
* exact dedup: ``GroupByKey`` on the content hash, the earliest document kept.
* near dedup: ``GroupByKey`` on ``(band, LSH bucket key)``; each bucket emits the same candidate
  pairs as the local runner (each member with the bucket's first and with the previous member),
  verified there with both signatures; confirmed pairs are joined into clusters (union-find) on
  one worker. Bound: that worker holds every confirmed pair (a few hundred bytes each).
* split: the same deterministic hash of the content (``position`` splits need a global order
  and are refused); contamination: the evaluation n-grams are a side input of the cleaning step.
* tokenizer: trained on one worker on the same deterministic sample (at most
  ``tokenizer.max_train_chars`` characters, in corpus order).
* tokenisation in parallel; each split's stream layout (a document's token offset) is computed
  from the per-document token counts on one worker, as is each split's ``documents.jsonl``
  (bound: a few hundred bytes per document), then token pieces are grouped by shard and every
  shard is written by its own worker.
* counts: ``CombinePerKey(sum)`` over per-document counters; ``removed`` records are written as
  ``removed-SSSSS-of-NNNNN.jsonl`` shards (lines sorted within a shard). Progress: the Beam
  counters ``lmtrain/documents_read`` and ``lmtrain/bytes_read`` (live in the Dataflow/Flink UI).

The driver then writes ``tokenizer/``, ``<split>/index.json``, ``manifest.json`` and
``DATASHEET.md`` from the pipeline's ``_beam/summary.json``. For the same input and config the
result equals the local runner's: shards, indexes, document lists, tokenizer and manifest counts
byte for byte; removed records as the same set of lines (``manifest.json`` ``runner`` says so).
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
from typing import NamedTuple

import numpy as np

from lmtrain.data import fs
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
SUMMARY = "_beam/summary.json"


class Doc(NamedTuple):
    order: tuple  # (source index, file index, document index): the corpus order
    id: str
    source: str
    licence: str
    text: str
    key: int
    chars: int
    time: float
    sig: object  # np.ndarray | None
    matches: object  # np.ndarray


def _beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise DataError(
            "--runner beam needs Apache Beam: pip install 'lmtrain[beam]' (apache-beam>=2.77)"
        ) from None
    return beam


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


def _read_unit(unit, cfg):
    from apache_beam import pvalue

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
    n = nbytes = 0
    for k, d in enumerate(docs):
        n += 1
        nbytes += (
            len(d.data) if isinstance(d.data, bytes) else len(d.data.encode("utf-8", "replace"))
        )
        yield ((si, fi, k), d)
    from apache_beam.metrics import Metrics

    Metrics.counter("lmtrain", "documents_read").inc(n)
    Metrics.counter("lmtrain", "bytes_read").inc(nbytes)
    name = spec["name"]
    stats = [(("read_documents", name), n), (("read_bytes", name), nbytes)]
    stats += [(("errors", r), c) for r, c in policy.counts.items()]
    stats += [(("source_decode", name, r), c) for r, c in Counter(src.decode_counts).items()]
    for s in stats:
        yield pvalue.TaggedOutput("stat", s)
    for j, m in enumerate(policy.examples):
        yield pvalue.TaggedOutput("example", ((0, si, fi, j), m))
    yield pvalue.TaggedOutput("files", ((si, fi), src.files))


_STAGES: dict = {}  # per worker: Stages built once per (config, eval n-grams) object


def _clean(item, cfg: dict, eval_ngrams, eval_vocab):
    """The shared per-document stages on one raw document."""
    from apache_beam import pvalue

    stages = _STAGES.get((id(cfg), id(eval_ngrams)))
    if stages is None:
        _STAGES.clear()
        stages = _STAGES[(id(cfg), id(eval_ngrams))] = Stages(cfg, eval_ngrams, eval_vocab)
    order, doc = item
    counts = {s: Counter() for s in STAGES}
    removed: list = []
    policy = ErrorPolicy(cfg["on_error"])
    out = stages.clean(doc, counts, removed, policy)
    for stage, c in counts.items():
        for k, n in c.items():
            yield pvalue.TaggedOutput("stat", (("stage", stage, k), n))
    for r, n in policy.counts.items():
        yield pvalue.TaggedOutput("stat", (("errors", r), n))
    for j, m in enumerate(policy.examples):
        yield pvalue.TaggedOutput("example", ((1, *order, j), m))
    for doc_id, stage, reason in removed:
        yield pvalue.TaggedOutput("removed", _record(doc_id, stage, reason))
    if out is None:
        return
    text, wh, t = out
    f = stages.features(text, wh)
    yield pvalue.TaggedOutput("stat", (("cleaned_documents",), 1))
    yield pvalue.TaggedOutput("stat", (("cleaned_chars",), f.chars))
    yield Doc(order, doc.id, doc.source, doc.licence, text, f.key, f.chars, t, f.sig, f.matches)


def _record(doc_id, stage, reason, dup_of=None) -> str:
    """A removed.jsonl line, exactly as the local runner writes it."""
    rec = {"id": doc_id, "stage": stage, "reason": reason}
    if dup_of is not None:
        rec["dup_of"] = dup_of
    return json.dumps(rec)


def _exact(kv):
    from apache_beam import pvalue

    group = sorted(kv[1], key=lambda d: d.order)
    yield group[0]
    for d in group[1:]:
        yield pvalue.TaggedOutput("removed", _record(d.id, "dedup", "exact_duplicate", group[0].id))
        yield pvalue.TaggedOutput("stat", (("exact_duplicates",), 1))


def _band_items(d: Doc, bands: int, rows: int):
    keys = band_keys(np.asarray(d.sig, np.uint32)[None, :], bands, rows)[0]
    return [((b, int(k)), (d.order, d.id, d.sig)) for b, k in enumerate(keys)]


def _bucket(kv, threshold: float):
    """The local runner's candidate pairs of one bucket (star + chain in corpus order), verified."""
    from apache_beam import pvalue

    members = sorted(kv[1], key=lambda m: m[0])
    for i in range(1, len(members)):
        b = members[i]
        for a in {members[0][0]: members[0], members[i - 1][0]: members[i - 1]}.values():
            yield pvalue.TaggedOutput("candidate", (a[0], b[0]))
            if float((a[2] == b[2]).mean()) >= threshold:
                yield (a[0], a[1], b[0], b[1])


def _clusters(pairs) -> dict:
    """Union-find over confirmed pairs; every node points at its component's earliest node."""
    pairs = sorted(set(pairs))
    parent: dict = {}
    ids: dict = {}

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for oa, ia, ob, ib in pairs:
        for o, i in ((oa, ia), (ob, ib)):
            if o not in parent:
                parent[o], ids[o] = o, i
        ra, rb = find(oa), find(ob)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    dup_of = {}
    roots = set()
    for o in parent:
        r = find(o)
        roots.add(r)
        if r != o:
            dup_of[o] = (ids[o], ids[r])
    return {"dup_of": dup_of, "confirmed_pairs": len({(p[0], p[2]) for p in pairs}),
            "clusters": len(roots)}  # fmt: skip


def _split_doc(d: Doc, cfg: dict):
    from apache_beam import pvalue

    sp, con = cfg["split"], cfg["contamination"]
    fr = (sp["train"], sp["validation"], sp["test"])
    sid = int(assign_splits(sp["method"], fr, content_hashes=np.array([d.key], np.uint64),
                            kept=np.array([True]), seed=cfg["seed"], times=np.array([d.time]),
                            cutoffs=tuple(sp["time_cutoffs"]))[0])  # fmt: skip
    if sid == 0 and d.matches.size and d.matches.size >= con["min_matches"]:
        yield pvalue.TaggedOutput("train_match", (d.order, d.matches))
        if con["drop"]:
            yield pvalue.TaggedOutput(
                "removed", _record(d.id, "contamination", "overlaps_eval_set")
            )
            yield pvalue.TaggedOutput("stat", (("contamination_dropped",), 1))
            return
    yield pvalue.TaggedOutput("stat", (("split", sid), 1))
    yield (sid, d)


def _sampled(item, cfg: dict, train_chars: int):
    sid, d = item
    sel = sample_mask(cfg, np.array([True]), np.array([d.key], np.uint64), train_chars)
    if sid == 0 and sel[0]:
        yield (d.order, d.text, d.chars)


def _train_tokenizer(samples, cfg: dict, charset) -> dict:
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


def _encode(item, payload: dict):
    sid, d = item
    fp = payload["info"]["fingerprint"]
    tok = _TOKS.get(fp)
    if tok is None:
        _TOKS.clear()
        tok = _TOKS[fp] = _load_tok(payload)
    ids = np.asarray(encode_batch(tok, [d.text], 1)[0], dtype=np.int64)
    dtype = token_dtype(tok.vocab_size)
    if ids.size and (ids.min() < 0 or ids.max() >= np.iinfo(dtype).max + 1):
        raise DataError(f"token id out of range for {dtype} shards")
    tokens = np.concatenate([ids, [tok.eos_id]]).astype(dtype)
    line = json.dumps({"id": d.id, "source": d.source, "licence": d.licence, "chars": d.chars,
                       "tokens": int(ids.size)}, ensure_ascii=False)  # fmt: skip
    yield (sid, d.order, tokens, line, d.source, d.licence, d.chars)


def _layout(lengths) -> dict:
    """Token offset of every document in its split's stream (corpus order)."""
    out: dict = {s: {} for s in range(len(SPLITS))}
    for sid in out:
        pos = 0
        for order, n in sorted((o, n) for s, o, n in lengths if s == sid):
            out[sid][order] = pos
            pos += n
    return out


def _pieces(enc, layout: dict, shard_tokens: int):
    sid, order, tokens = enc[0], enc[1], enc[2]
    start = layout[sid][order]
    pos = 0
    while pos < tokens.size:
        shard, off = divmod(start + pos, shard_tokens)
        take = min(tokens.size - pos, shard_tokens - off)
        yield ((sid, shard), (off, tokens[pos : pos + take]))
        pos += take


def _write_shard(kv, out: str, chunk_tokens: int):
    from array_record.python.array_record_module import ArrayRecordWriter

    (sid, shard), pieces = kv
    stream = np.concatenate([p[1] for p in sorted(pieces, key=lambda p: p[0])])
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
    yield (sid, shard, {"file": name, "num_records": records, "num_tokens": int(stream.size),
                        "sha256": sha})  # fmt: skip


def _write_removed(kv, out: str):
    shard, lines = kv
    fs.write_text(
        f"{out}/removed-{shard:05d}-of-{REMOVED_SHARDS:05d}.jsonl",
        "".join(line + "\n" for line in sorted(lines)),
    )
    yield shard


def _write_lists(lines, out: str):
    for sid, s in enumerate(SPLITS):
        rows = sorted((o, line) for k, o, line in lines if k == sid)
        fs.write_text(f"{out}/{s}/documents.jsonl", "".join(line + "\n" for _, line in rows))
    yield len(lines)


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


def build_pipeline(p, cfg: dict, out: str, evals: EvalSets | None):
    """Adds the data stage to the Beam pipeline ``p``, writing under ``out``."""
    beam = _beam()
    from apache_beam.pvalue import AsList, AsSingleton

    d = cfg["dedup"]
    units, list_errors = _units(cfg)
    read = (
        p
        | "Units" >> beam.Create(units)
        | "SpreadUnits" >> beam.Reshuffle()
        | "Read"
        >> beam.FlatMap(_read_unit, cfg).with_outputs("stat", "example", "files", main="docs")
    )
    cleaned = (
        read.docs
        | "SpreadDocs" >> beam.Reshuffle()
        | "Clean" >> beam.FlatMap(_clean, cfg, *((evals.all_ngrams, evals.vocab) if evals else (None, None)))
        .with_outputs("stat", "example", "removed", main="docs")
    )  # fmt: skip
    stat_parts = [read.stat, cleaned.stat, p | "ListErrors" >> beam.Create(
        [e for e in list_errors if e[0][0] == "errors"])]  # fmt: skip
    example_parts = [read.example, cleaned.example, p | "ListExamples" >> beam.Create(
        [(k[1], m) for k, m in list_errors if k[0] == "example"])]  # fmt: skip
    removed_parts = [cleaned.removed]
    docs = cleaned.docs
    if d["exact"]:
        ex = (
            docs
            | "ByHash" >> beam.Map(lambda x: (x.key, x))
            | "GroupHash" >> beam.GroupByKey()
            | "Exact" >> beam.FlatMap(_exact).with_outputs("removed", "stat", main="docs")
        )
        docs = ex.docs
        stat_parts.append(ex.stat)
        removed_parts.append(ex.removed)
    bands, rows = (d["bands"], d["rows"]) if d["bands"] and d["rows"] else lsh_params(
        d["threshold"], d["num_perm"])  # fmt: skip
    docs, near, candidates = _near_dedup(p, docs, d, bands, rows, stat_parts, removed_parts)
    split = docs | "Split" >> beam.FlatMap(_split_doc, cfg).with_outputs(
        "train_match", "removed", "stat", main="docs")  # fmt: skip
    stat_parts.append(split.stat)
    removed_parts.append(split.removed)
    drop = cfg["contamination"]["drop"]
    contamination = (
        split.train_match
        | "Matches" >> beam.combiners.ToList()
        | "Report" >> beam.Map(lambda ms: evals.report(dict(ms), set(dict(ms)) if drop else set())
                               if evals else [])
    )  # fmt: skip
    kept = split.docs
    train = kept | "Train" >> beam.Filter(lambda x: x[0] == 0)
    train_chars = train | "TrainChars" >> beam.Map(lambda x: x[1].chars) | "SumChars" >> beam.CombineGlobally(sum)  # fmt: skip
    tok, enc, shards = _encode_and_shard(kept, train, train_chars, cfg, out)
    stat_parts.append(enc | "SplitStats" >> beam.FlatMap(lambda e: [
        (("split_documents", e[0]), 1), (("split_chars", e[0]), e[6]),
        (("split_tokens", e[0]), int(e[2].size) - 1), (("per_source", e[4], e[5], e[0]), 1)]))  # fmt: skip
    if cfg["output"]["document_lists"]:
        (enc | "ListLines" >> beam.Map(lambda e: (e[0], e[1], e[3]))
         | "AllLines" >> beam.combiners.ToList() | "WriteLists" >> beam.FlatMap(_write_lists, out))  # fmt: skip
    (tuple(removed_parts) | "AllRemoved" >> beam.Flatten()
     | "RemovedShard" >> beam.Map(lambda line: (zlib.crc32(line.encode()) % REMOVED_SHARDS, line))
     | "GroupRemoved" >> beam.GroupByKey()
     | "WriteRemoved" >> beam.FlatMap(_write_removed, out))  # fmt: skip
    stats = tuple(stat_parts) | "AllStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum)
    examples = tuple(example_parts) | "AllExamples" >> beam.Flatten() | beam.combiners.Top.Smallest(20)  # fmt: skip
    files = read.files
    (p | "One" >> beam.Create([None]) | "Summary" >> beam.FlatMap(
        _summary, out, AsList(stats), AsSingleton(examples), AsList(files), AsSingleton(near),
        AsSingleton(candidates), AsSingleton(contamination), AsSingleton(tok), AsList(shards)))  # fmt: skip


def _near_dedup(p, docs, d: dict, bands: int, rows: int, stat_parts: list, removed_parts: list):
    """Near-duplicate removal (MinHash LSH buckets, confirmed pairs, clusters): (docs kept,
    the clusters as one value, the count of candidate pairs); stats and removed records are
    appended to the lists."""
    beam = _beam()
    from apache_beam.pvalue import AsSingleton

    empty_near = {"dup_of": {}, "confirmed_pairs": 0, "clusters": 0}
    if d["near"]:
        buckets = (
            docs
            | "Bands" >> beam.FlatMap(_band_items, bands, rows)
            | "GroupBucket" >> beam.GroupByKey()
            | "Pairs" >> beam.FlatMap(_bucket, d["threshold"]).with_outputs("candidate", main="pairs")
        )  # fmt: skip
        near = buckets.pairs | "Clusters" >> beam.combiners.ToList() | beam.Map(_clusters)
        candidates = (
            buckets.candidate
            | "DistinctCandidates" >> beam.Distinct()
            | "CountCandidates" >> beam.combiners.Count.Globally()
        )
        near_side = AsSingleton(near)
        docs = docs | "DropNear" >> beam.Filter(lambda x, n: x.order not in n["dup_of"], near_side)
        removed_parts.append(near | "NearRecords" >> beam.FlatMap(lambda n: [
            _record(i, "dedup", "near_duplicate", rep) for i, rep in n["dup_of"].values()]))  # fmt: skip
        stat_parts.append(near | "NearCount" >> beam.Map(lambda n: (("near_duplicates",), len(n["dup_of"]))))  # fmt: skip
    else:
        near = p | "NoNear" >> beam.Create([empty_near])
        candidates = p | "NoCandidates" >> beam.Create([0])
    return docs, near, candidates


def _encode_and_shard(kept, train, train_chars, cfg: dict, out: str):
    """The tokenizer trained on a sample of the train split, every kept document encoded, and
    the token shards written: (tokenizer, encoded documents, shards)."""
    beam = _beam()
    from apache_beam.pvalue import AsSingleton

    samples = (
        kept
        | "Sample" >> beam.FlatMap(_sampled, cfg, AsSingleton(train_chars))
        | "SampleList" >> beam.combiners.ToList()
    )
    charset = (
        train
        | "Chars" >> beam.Map(lambda x: (set(x[1].text), 1, x[1].chars))
        | "Charset" >> beam.CombineGlobally(lambda xs: _union(xs))
    )
    tok = samples | "Tokenizer" >> beam.Map(_train_tokenizer, cfg, AsSingleton(charset))
    enc = kept | "Encode" >> beam.FlatMap(_encode, AsSingleton(tok))
    shard_tokens = max(1, cfg["output"]["shard_tokens"] // cfg["output"]["chunk_tokens"]) * cfg[
        "output"]["chunk_tokens"]  # fmt: skip
    layout = (
        enc
        | "Lengths" >> beam.Map(lambda e: (e[0], e[1], int(e[2].size)))
        | "LengthList" >> beam.combiners.ToList()
        | "Layout" >> beam.Map(_layout)
    )
    shards = (
        enc
        | "Pieces" >> beam.FlatMap(_pieces, AsSingleton(layout), shard_tokens)
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


class _Shim:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def prepare_beam(config, out_dir: str, overwrite: bool = False, beam_options: str = "") -> dict:
    """Runs the Beam pipeline, then writes the tokenizer, indexes and manifest; returns it."""
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

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
        con = cfg["contamination"]
        evals = EvalSets(con["eval_sets"], con["ngram"]) if con["eval_sets"] else None
        args = shlex.split(beam_options or "")
        if not any(a.startswith("--runner") for a in args):
            args.append("--runner=DirectRunner")
        t0 = time.monotonic()
        try:
            with beam.Pipeline(options=PipelineOptions(args)) as p:
                build_pipeline(p, cfg, stage, evals)
        except DataError:
            raise
        except Exception as e:  # Beam wraps worker exceptions; keep our one-line messages
            msg = str(e)
            if "DataError" in msg or "lmtrain.errors" in msg:
                raise DataError(msg.strip().splitlines()[-1][:2000]) from None
            raise
        manifest = _finish(cfg, stage, json.loads(fs.read_bytes(f"{stage}/{SUMMARY}")))
        fs.as_path(f"{stage}/_beam").rmtree()
        fs.write_text(f"{stage}/manifest.json",
                      json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")  # fmt: skip
        if not remote:
            commit_output(Path(stage), out)
        print(f"[data] beam pipeline finished in {time.monotonic() - t0:.1f} s")
    except BaseException:
        if not remote:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


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
