"""``lmtrain data prepare``: raw text → versioned, deduplicated, PII-scrubbed token shards.

    from lmtrain.data.prepare import prepare
    manifest = prepare(config, "data_out/stdlib")      # config: configs/data/default.py

Passes (memory bounded: texts live on disk between passes, only per-document arrays in RAM):

1. **scan** (parallel, ``num_workers`` processes, ordered): sources → decode → markup →
   normalise → quality → PII (``lmtrain/data/clean.py``); texts spilled to disk, content hashes,
   MinHash signatures (on disk) and eval-set n-gram hits kept.
2. **dedup** exact then near (``dedup.py``), **split** (``split.py``), **contamination** report
   and optional drop (``contamination.py``).
3. **tokenizer**: trained on (a sample of) the train split only, or loaded from
   ``tokenizer.path``; saved to ``<out>/tokenizer/``.
4. **write**: each split encoded into ``<out>/<split>/`` with :class:`ShardWriter`, then
   ``manifest.json`` and ``DATASHEET.md``.

Everything is built in a hidden sibling directory that replaces ``out_dir`` only on success.
Same inputs and config ⇒ byte-identical output, except ``manifest.json``'s ``created`` field.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from lmtrain.data import clean, fs
from lmtrain.data.contamination import EvalSets
from lmtrain.data.datasheet import write_datasheet
from lmtrain.data.dedup import SignatureFile, exact_duplicates, lsh_params, near_duplicates
from lmtrain.data.encode import encode_batch, train_or_load_tokenizer
from lmtrain.data.manifest import build_manifest
from lmtrain.data.prepare_config import resolve
from lmtrain.data.progress import Progress, estimate_bytes
from lmtrain.data.shards import ShardWriter
from lmtrain.data.sources import ErrorPolicy, open_source
from lmtrain.data.split import SPLITS, assign_splits
from lmtrain.errors import DataError

MANIFEST = "manifest.json"


def runner_note(name: str) -> dict:
    """Which outputs the two runners (local, Beam) reproduce byte for byte and which as sets."""
    return {
        "name": name,
        "byte_identical": [
            "<split>/shard-*.array_record", "<split>/index.json", "<split>/documents.jsonl",
            "tokenizer/", "manifest.json counts",
        ],
        "same_set_of_lines": ["removed.jsonl (local) / removed-*-of-*.jsonl (beam)"],
    }  # fmt: skip


def num_workers(cfg: dict) -> int:
    n = cfg["num_workers"]
    if n < 0:
        n = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    return n


def prepare(
    config, out_dir: str | os.PathLike, overwrite: bool = False, stats: dict | None = None
) -> dict:
    """Runs the whole data preparation; returns the manifest (also written to ``manifest.json``).

    Refuses a non-empty ``out_dir`` unless ``overwrite``; never leaves a partial ``out_dir``.
    ``stats``, when given, receives the CPU seconds per stage (``cpu_s``) for benchmarks (kept
    out of the manifest, which must not depend on the machine).
    """
    cfg = resolve(config)
    if fs.is_remote(out_dir):  # a bucket: build on local disk, then upload (manifest last)
        fs.check_empty(out_dir, overwrite)
        tmp = Path(tempfile.mkdtemp(prefix="lmtrain-data-"))
        try:
            manifest = _build(cfg, tmp, stats if stats is not None else {})
            fs.upload_tree(tmp, out_dir, overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest
    out = Path(out_dir).absolute()
    if out.exists():
        if not out.is_dir():
            raise DataError(f"output {out} exists and is a file; choose a directory path")
        if any(out.iterdir()) and not overwrite:
            raise DataError(
                f"output {out} already exists and is not empty; choose another directory or pass overwrite=True"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _build(cfg, tmp, stats if stats is not None else {})
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def commit_output(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _ordered(items, fn, workers: int, init_args: tuple):
    """Yields ``fn(item)`` in input order, at most ``2 * workers + 1`` items in flight."""
    if workers == 0:
        clean.init_worker(*init_args)
        for item in items:
            yield fn(item)
        return
    import multiprocessing as mp

    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=clean.init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Scan:
    """Per-document arrays from pass 1, in corpus order (index = position in the spill)."""

    def __init__(self, num_perm: int, work: Path):
        self.keys, self.chars, self.times, self.batch_sizes = [], [], [], []
        self.matches: dict[int, np.ndarray] = {}
        self.sigfile = SignatureFile(work / "signatures.u32", num_perm)
        self.counts = {s: Counter() for s in clean.STAGES}
        self.errors: Counter = Counter()
        self.error_examples: list[str] = []
        self.n = 0

    def add(self, res: dict, removed_file) -> None:
        for local, m in res["matches"].items():
            self.matches[self.n + local] = m
        self.n += res["n"]
        self.batch_sizes.append(res["n"])
        self.keys.append(res["keys"])
        self.chars.append(res["chars"])
        self.times.append(res["times"])
        self.sigfile.append(res["sigs"])
        for stage, c in res["counts"].items():
            self.counts[stage].update(c)
        self.errors.update(res["errors"])
        self.error_examples.extend(res["error_examples"][: 20 - len(self.error_examples)])
        for doc_id, stage, reason in res["removed"]:
            removed_file.write(json.dumps({"id": doc_id, "stage": stage, "reason": reason}) + "\n")

    def finish(self) -> None:
        self.sigfile.close()
        self.keys = np.concatenate(self.keys) if self.keys else np.zeros(0, np.uint64)
        self.chars = np.concatenate(self.chars) if self.chars else np.zeros(0, np.int64)
        self.times = np.concatenate(self.times) if self.times else np.zeros(0)


def iter_spill(work: Path, batch_sizes, select=None):
    """(index, (id, source, licence, text)) in corpus order; ``select[index]`` filters."""
    g = 0
    for b, size in enumerate(batch_sizes):
        if select is not None and not select[g : g + size].any():
            g += size
            continue
        for doc in clean.read_spill(str(work / "spill"), b) if size else ():
            if select is None or select[g]:
                yield g, doc
            g += 1


def _batches(sources, cfg):
    batch, size, index = [], 0, 0
    for src in sources:
        for doc in src:
            batch.append(doc)
            size += len(doc.data)
            if len(batch) >= cfg["batch_docs"] or size >= cfg["batch_bytes"]:
                yield index, batch
                batch, size, index = [], 0, index + 1
    if batch:
        yield index, batch


def _build(cfg: dict, tmp: Path, stats: dict) -> dict:
    cpu = stats.setdefault("cpu_s", {})
    clock = [time.process_time()]

    def lap(stage: str) -> None:  # this process's CPU seconds (all threads) since the last lap
        now = time.process_time()
        cpu[stage] = cpu.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    work = tmp / "_work"
    (work / "spill").mkdir(parents=True)
    workers = num_workers(cfg)
    con = cfg["contamination"]
    evals = EvalSets(con["eval_sets"], con["ngram"]) if con["eval_sets"] else None

    # Pass 1: read, clean and spill.
    policy = ErrorPolicy(cfg["on_error"])
    sources = [
        open_source(s, policy, cfg["normalize"]["invalid_utf8"], cfg["split"]["time_field"])
        for s in cfg["sources"]
    ]
    with open(tmp / "removed.jsonl", "w") as removed:
        scan, docs_read, bytes_read = _read_and_clean(
            cfg, work, sources, policy, evals, removed, stats, lap
        )
        exact, near, lsh_stats, split_ids, contamination, dropped = _dedup_split_contamination(
            cfg, scan, evals, work, removed
        )
    lap("dedup_split_contamination")

    # Pass 3: tokenizer on the train split only.
    train_sel = split_ids == 0
    if not train_sel.any():
        raise DataError(
            "the train split is empty after filtering and dedup; add data or raise config.split.train"
        )
    tok, tok_info = train_or_load_tokenizer(cfg, lambda sel: (doc[3] for _, doc in iter_spill(work, scan.batch_sizes, sel)),
                                            train_sel, scan.keys, scan.chars, workers)  # fmt: skip
    tok.save(tmp / "tokenizer")
    lap("tokenizer_train")

    # Pass 4: encode and write the splits.
    indexes, per_split, per_source, encode_cpu = _encode_and_write(
        cfg, tmp, work, tok, scan, split_ids, workers
    )
    v = per_split["validation"]
    tok_info["chars_per_token_validation"] = (
        round(v["chars"] / v["tokens"], 4) if v["tokens"] else None
    )
    shutil.rmtree(work)
    lap("encode_write")
    cpu["encode_write"] -= encode_cpu
    cpu["encode"] = encode_cpu
    cpu["write"] = cpu.pop("encode_write")

    manifest = build_manifest(cfg, sources, docs_read, bytes_read, scan, exact, near, lsh_stats, split_ids,
                              contamination, dropped, tok, tok_info, indexes, per_split, per_source)  # fmt: skip
    manifest["runner"] = runner_note("local")
    write_datasheet(tmp / "DATASHEET.md", manifest)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    lap("manifest")
    return manifest


def _encode_and_write(cfg: dict, tmp: Path, work: Path, tok, scan, split_ids, workers: int):
    """Pass 4: encode the kept documents in batches of ``batch_bytes`` and write each split's
    shards (and document lists); (shard indexes, per-split and per-source counts, encode CPU s)."""
    out = cfg["output"]
    writers = {s: ShardWriter(tmp / s, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                              chunk_tokens=out["chunk_tokens"], shard_tokens=out["shard_tokens"]) for s in SPLITS}  # fmt: skip
    lists = (
        {s: open(tmp / s / "documents.jsonl", "w") for s in SPLITS} if out["document_lists"] else {}
    )
    per_split = {s: Counter() for s in SPLITS}
    per_source = Counter()
    pending: list = []
    encode_cpu = [0.0]

    def flush():
        t0 = time.process_time()
        ids = encode_batch(tok, [doc[3] for _, doc, _ in pending], workers)
        encode_cpu[0] += time.process_time() - t0
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        sums = {s: [0, 0, 0] for s in SPLITS}  # documents, chars, tokens: one update per batch
        for (_, doc, s), toks in zip(pending, ids):
            by_split[s].append(toks)
            c = sums[s]
            c[0], c[1], c[2] = c[0] + 1, c[1] + len(doc[3]), c[2] + len(toks)
            per_source[(doc[1], doc[2], s)] += 1
            if lists:
                lists[s].write(
                    json.dumps(
                        {
                            "id": doc[0],
                            "source": doc[1],
                            "licence": doc[2],
                            "chars": len(doc[3]),
                            "tokens": len(toks),
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        for s, docs in by_split.items():
            writers[s].add_many(docs)
            n, chars, tokens = sums[s]
            if n:
                per_split[s].update(documents=n, chars=chars, tokens=tokens)
        pending.clear()

    size = 0
    for g, doc in iter_spill(work, scan.batch_sizes, split_ids >= 0):
        pending.append((g, doc, SPLITS[split_ids[g]]))
        size += len(doc[3])
        if size >= cfg["batch_bytes"]:
            flush()
            size = 0
    flush()
    indexes = {s: w.close() for s, w in writers.items()}
    for f in lists.values():
        f.close()
    return indexes, per_split, per_source, encode_cpu[0]


def _read_and_clean(cfg: dict, work: Path, sources, policy, evals, removed, stats: dict, lap):
    """Pass 1: read, clean and spill every document (removals to ``removed``); (scan,
    documents read and bytes read per source)."""
    cpu, workers = stats["cpu_s"], num_workers(cfg)
    scan = Scan(cfg["dedup"]["num_perm"], work)
    docs_read = Counter()
    bytes_read = Counter()

    def counted(batches):
        for index, batch in batches:
            for d in batch:
                docs_read[d.source] += 1
                bytes_read[d.source] += (
                    len(d.data)
                    if isinstance(d.data, bytes) or d.data.isascii()  # isascii: a flag, O(1)
                    else len(d.data.encode("utf-8", "replace"))
                )
            yield index, batch

    init = (cfg, str(work / "spill"), *((evals.all_ngrams, evals.vocab) if evals else (None, None)))
    progress = Progress(estimate_bytes(cfg))
    worker_cpu = 0.0
    clean_cpu = stats.setdefault("clean_cpu_s", {})  # the part of clean_workers per stage
    for res in _ordered(counted(_batches(sources, cfg)), clean.work, workers, init):
        scan.add(res, removed)
        progress.update(res["docs_in"], res["bytes_in"])
        worker_cpu += res["cpu_s"]
        for k, v in res["stage_cpu_s"].items():
            clean_cpu[k] = clean_cpu.get(k, 0.0) + v
    scan.finish()
    progress.finish()
    lap("read_and_clean")
    # Worker CPU is reported by the workers; with workers=0 it is already in this process's.
    cpu["clean_workers"] = worker_cpu
    if workers == 0:
        cpu["read_and_clean"] -= worker_cpu
    scan.errors.update(policy.counts)
    scan.error_examples = (policy.examples + scan.error_examples)[:20]
    if sum(docs_read.values()) == 0:
        raise DataError(
            f"empty corpus: the sources {[s['name'] for s in cfg['sources']]} gave no documents; check config.sources paths"
        )
    if scan.n == 0:
        raise DataError(
            f"every one of the {sum(docs_read.values())} documents was removed by cleaning/filters "
            f"(see counts: {dict((k, dict(v)) for k, v in scan.counts.items() if v)}); relax config.quality"
        )
    return scan, docs_read, bytes_read


def _dedup_split_contamination(cfg: dict, scan, evals, work: Path, removed):
    """Pass 2: exact and near duplicates, the split of each kept document and the train
    documents that overlap evaluation sets; (exact, near, LSH stats, split ids,
    contamination report, dropped documents)."""
    con = cfg["contamination"]
    d = cfg["dedup"]
    exact = exact_duplicates(scan.keys) if d["exact"] else np.full(scan.n, -1, np.int64)
    bands, rows = (
        (d["bands"], d["rows"])
        if d["bands"] and d["rows"]
        else lsh_params(d["threshold"], d["num_perm"])
    )
    lsh_stats = {"bands": bands, "rows": rows}
    near = np.full(scan.n, -1, np.int64)
    if d["near"]:
        near, lsh_stats = near_duplicates(
            scan.sigfile, exact < 0, threshold=d["threshold"], bands=bands, rows=rows
        )
    kept = (exact < 0) & (near < 0)
    sp = cfg["split"]
    split_ids = assign_splits(sp["method"], (sp["train"], sp["validation"], sp["test"]), content_hashes=scan.keys,
                              kept=kept, seed=cfg["seed"], times=scan.times, cutoffs=tuple(sp["time_cutoffs"]))  # fmt: skip
    train_matches = {
        g: m
        for g, m in sorted(scan.matches.items())
        if split_ids[g] == 0 and m.size >= con["min_matches"]
    }
    dropped = set(train_matches) if con["drop"] else set()
    for g in sorted(dropped):
        kept[g] = False
        split_ids[g] = -1
    contamination = evals.report(train_matches, dropped) if evals else []
    _write_dup_records(work, scan, exact, near, dropped, removed)
    return exact, near, lsh_stats, split_ids, contamination, dropped


def _write_dup_records(work: Path, scan: Scan, exact, near, dropped, removed) -> None:
    """Appends exact/near/contamination removals to removed.jsonl (with the id kept instead)."""
    need_rep = set(exact[exact >= 0].tolist()) | set(near[near >= 0].tolist())
    select = (exact >= 0) | (near >= 0) | np.isin(np.arange(scan.n), list(need_rep | dropped))
    ids: dict[int, str] = {}
    for g, doc in iter_spill(work, scan.batch_sizes, select):
        if g in need_rep:
            ids[g] = doc[0]
        if exact[g] >= 0:
            removed.write(
                json.dumps(
                    {
                        "id": doc[0],
                        "stage": "dedup",
                        "reason": "exact_duplicate",
                        "dup_of": ids[int(exact[g])],
                    }
                )
                + "\n"
            )
        elif near[g] >= 0:
            removed.write(
                json.dumps(
                    {
                        "id": doc[0],
                        "stage": "dedup",
                        "reason": "near_duplicate",
                        "dup_of": ids[int(near[g])],
                    }
                )
                + "\n"
            )
        elif g in dropped:
            removed.write(
                json.dumps({"id": doc[0], "stage": "contamination", "reason": "overlaps_eval_set"})
                + "\n"
            )
