"""Data-preparation throughput and peak memory on a generated corpus of a given size.

    python tools/bench_data.py --size-mb 1000 [--workers -1] [--runner local|beam]
        [--beam-options "..."] [--keep DIR] [--config.<key>=value ...]

Generates ``--size-mb`` MB of JSONL documents (pseudo-English prose from a Zipf vocabulary with the
Gopher stop words) into a temporary directory, with the things the pipeline must handle planted at
known rates: exact duplicates (3%), near duplicates with one word changed (3%), PII of every kind
(5% of documents), junk that the quality filters drop (4%: too short, repeated lines, symbol soup),
lines with invalid UTF-8 (0.1%), plus an evaluation set whose passages are planted in 20 documents.
Then runs the full ``lmtrain data prepare`` pipeline (all stages on, SentencePiece BPE 4096) on it
and prints documents/s, MB/s and the peak resident memory of the whole process tree (this process
plus its worker processes, sampled every 50 ms from /proc), the per-stage counts, and (local
runner; on Beam from the pipeline's ``lmtrain_cpu_us`` counters, the rest being the runner's own
work) MB of text per CPU-second per stage, so the slow stage is named, with the end-to-end
figure without tokenizer training next to the full one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STOP = ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for", "on"]
PII = [
    "Contact jane.doe{i}@example.com for details.",
    "Call me at +44 20 7946 {i:04d} or (555) 123-{i:04d} tomorrow.",
    "The server at 93.184.{a}.{b} answered; so did 2001:db8:85a3::8a2e:370:{i:x}.",
    "Paid with card 4111 1111 1111 1111 and kept the receipt.",
    "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE and api_key = 'sk{i}live9x8y7z6w5v'",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA{i}x\n-----END RSA PRIVATE KEY-----",
    "token ghp_{i:036d} leaked in the log.",
]


class PeakRss:
    """Samples the summed RSS of this process and all its descendants (psutil) every ``dt`` s, and
    their CPU time (user + system, the last value seen per process): on a shared machine CPU
    seconds measure the pipeline's cost independently of how busy the other tenants are."""

    def __init__(self, dt: float = 0.05):
        import psutil

        self.proc, self.dt, self.peak = psutil.Process(), dt, 0
        self.cpu: dict[int, float] = {}
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                self.cpu[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        return total

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values()) - self.cpu0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.dt)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu[self.proc.pid] = sum(self.proc.cpu_times()[:2])


def make_vocab(rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27) ** 0.9
    p /= p.sum()
    lengths = np.clip(rng.poisson(5.0, n), 2, 12)
    words = {"".join(rng.choice(letters, size=k, p=p)) for k in lengths}
    return np.array(STOP + sorted(words - set(STOP)))


def make_sentences(rng: np.random.Generator, vocab: np.ndarray, n: int) -> list[str]:
    cdf = np.cumsum(1.0 / np.arange(1, vocab.size + 1) ** 1.05)
    cdf /= cdf[-1]
    out = []
    for _ in range(n):
        k = int(rng.integers(8, 25))
        words = vocab[np.searchsorted(cdf, rng.random(k)).clip(max=vocab.size - 1)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def generate(root: Path, size_mb: float, seed: int = 0) -> dict:
    """Writes ``raw/part-*.jsonl`` and ``eval.jsonl`` under ``root``; returns what was planted."""
    rng = np.random.default_rng(seed)
    vocab = make_vocab(rng)
    pool = make_sentences(rng, vocab, 50_000)
    raw = root / "raw"
    raw.mkdir(parents=True)
    target = int(size_mb * 1e6)
    # Evaluation passages are fresh text (not from the sentence pool), so only planted copies match.
    evals = [" ".join(make_sentences(rng, vocab, 4)) for _ in range(20)]
    with open(root / "eval.jsonl", "w") as f:
        for e in evals:
            f.write(json.dumps({"text": e}) + "\n")
    planted = {"exact": 0, "near": 0, "pii_docs": 0, "junk": 0, "invalid_utf8": 0, "eval": 0}
    written, part, docs, recent = 0, 0, 0, []
    f = open(raw / "part-00000.jsonl", "wb")  # noqa: SIM115
    while written < target:
        r = rng.random()
        if r < 0.03 and recent:
            text = recent[int(rng.integers(len(recent)))]
            planted["exact"] += 1
        elif r < 0.06 and recent:
            words = recent[int(rng.integers(len(recent)))].split(" ")
            words[int(rng.integers(len(words)))] = "changed"
            text = " ".join(words)
            planted["near"] += 1
        elif r < 0.10:
            kind = int(rng.integers(3))
            if kind == 0:
                text = "Buy now. Click here."
            elif kind == 1:
                text = "\n".join(["Subscribe to our newsletter today and save."] * 30)
            else:
                text = " ".join(["#### $$$ ... ###"] * 60)
            planted["junk"] += 1
        else:
            paras = []
            for _ in range(int(rng.integers(2, 8))):
                idx = rng.integers(0, len(pool), int(rng.integers(3, 9)))
                paras.append(" ".join(pool[int(j)] for j in idx))
            if rng.random() < 0.05:
                i = int(rng.integers(10000))
                a, b = int(rng.integers(256)), int(rng.integers(1, 255))
                paras.insert(1, PII[int(rng.integers(len(PII)))].format(i=i, a=a, b=b))
                planted["pii_docs"] += 1
            if planted["eval"] < len(evals) and rng.random() < 0.001:
                paras.insert(1, evals[planted["eval"]])
                planted["eval"] += 1
            text = "\n\n".join(paras)
            if len(recent) < 256:
                recent.append(text)
            else:
                recent[int(rng.integers(256))] = text
        line = json.dumps({"id": f"d{docs}", "text": text}).encode()
        if rng.random() < 0.001 and b". " in line:
            line = line.replace(b". ", b". \xff\xfe ", 1)  # invalid UTF-8 inside the JSON string
            planted["invalid_utf8"] += 1
        f.write(line + b"\n")
        written += len(line) + 1
        docs += 1
        if f.tell() >= 64_000_000:
            f.close()
            part += 1
            f = open(raw / f"part-{part:05d}.jsonl", "wb")  # noqa: SIM115
    f.close()
    return {"documents": docs, "bytes": written, **planted}


def bench_config(raw: Path, eval_path: Path, workers: int):
    from lmtrain.data.prepare_config import default_config, source

    c = default_config()
    c.sources = (source(name="bench", paths=(str(raw),), licence="generated"),)
    c.num_workers = workers
    c.contamination.eval_sets = (str(eval_path),)
    c.contamination.drop = True
    c.tokenizer.vocab_size = 4096
    return c


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mb", type=float, default=100.0)
    p.add_argument("--workers", type=int, default=-1, help="-1: one per core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default="", help="keep the prepared output here")
    p.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    p.add_argument("--runner", choices=("local", "beam"), default="local")
    p.add_argument("--beam-options", default="", help="Beam pipeline options (--runner beam)")
    args, rest = p.parse_known_args()
    overrides = [a[len("--config.") :] for a in rest if a.startswith("--config.")]
    if len(overrides) != len(rest):
        p.error(f"unknown arguments {rest}")

    from lmtrain.config import apply_overrides
    from lmtrain.data.prepare import prepare

    scratch = Path(tempfile.mkdtemp(prefix="bench_data-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        planted = generate(scratch, args.size_mb, args.seed)
        gen_s = time.perf_counter() - t0
        print(f"generated {planted['documents']:,} documents, {planted['bytes'] / 1e6:,.1f} MB in {gen_s:.1f} s; "
              f"planted {json.dumps({k: v for k, v in planted.items() if k not in ('documents', 'bytes')})}", flush=True)  # fmt: skip
        cfg = bench_config(scratch / "raw", scratch / "eval.jsonl", args.workers)
        apply_overrides(cfg, overrides)
        out = Path(args.keep) if args.keep else scratch / "out"
        stats: dict = {}
        with PeakRss() as mem:
            t0 = time.perf_counter()
            if args.runner == "beam":
                from lmtrain.data.beam_runner import prepare_beam

                m = prepare_beam(cfg, str(out), bool(args.keep), args.beam_options, stats=stats)
            else:
                m = prepare(cfg, out, overwrite=bool(args.keep), stats=stats)
            wall = time.perf_counter() - t0
        st = m["stages"]
        docs, mb = st["read"]["documents"], st["read"]["bytes"] / 1e6
        print(json.dumps({"flow": m["flow"], "errors": st["errors"]["skipped"], "decode": st["decode"],
                          "quality_dropped": st["quality"]["dropped"], "pii": st["pii"]["replacements"],
                          "exact_duplicates": st["dedup"]["exact_duplicates"],
                          "near_duplicates": st["dedup"]["near_duplicates"],
                          "contamination": [{k: e[k] for k in ("name", "contaminated_examples", "train_documents_dropped")}
                                            for e in st["contamination"]["eval_sets"]],
                          "chars_per_token_validation": m["tokenizer"]["chars_per_token_validation"]}, indent=1))  # fmt: skip
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(
            f"size {mb:,.1f} MB, {docs:,} documents, workers {args.workers} on {cores} cores, wall {wall:.1f} s"
        )
        print(
            f"throughput {docs / wall:,.0f} documents/s, {mb / wall:.2f} MB/s; peak RSS (process tree) {mem.peak / 2**20:,.0f} MiB"
        )
        cpu = mem.cpu_seconds
        print(
            f"CPU time (process tree) {cpu:,.0f} s: {mb / cpu:.2f} MB and {docs / cpu:,.0f} documents per CPU-second "
            f"(on {cores} otherwise idle cores the wall-clock rate would approach {cores} x this)"
        )
        stage_cpu = stats.get("cpu_s", {})
        if stage_cpu:
            # Worker processes' CPU minus what they report for cleaning is the hand-off cost
            # (pickling batches and results): counted with reading. On Beam the rest is the
            # runner's own work (coders, shuffles, bundle handling) outside our steps.
            other = max(cpu - sum(stage_cpu.values()), 0.0)
            rest = "beam_runner_and_other" if args.runner == "beam" else "handoff_and_other"
            rows = dict(stage_cpu, **{rest: other})
            print("MB of text per CPU-second by stage (process tree; CPU s in brackets):")
            for name, sec in rows.items():
                rate = f"{mb / sec:8.2f}" if sec > 0 else "     inf"
                print(f"  {name:28s} {rate}  ({sec:.1f} s)")
            for name, sec in stats.get("clean_cpu_s", {}).items():
                rate = f"{mb / sec:8.2f}" if sec > 0 else "     inf"
                print(f"    clean: {name:19s} {rate}  ({sec:.1f} s)")
            no_tok = cpu - stage_cpu.get("tokenizer_train", 0.0)
            print(f"end to end without tokenizer training: {mb / no_tok:.2f} MB per CPU-second")
            slow = max((k for k in rows if k != "tokenizer_train"), key=rows.get)
            inner = stats.get("clean_cpu_s", {})
            detail = (
                f" (within it: {max(inner, key=inner.get)})"
                if slow == "clean_workers" and inner
                else ""
            )
            print(
                f"slowest stage (tokenizer training aside): {slow}{detail}, {mb / rows[slow]:.2f} MB per CPU-second"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
