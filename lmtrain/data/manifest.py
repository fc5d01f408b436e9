"""The dataset manifest: everything needed to audit and reproduce a prepared dataset.

Deterministic by construction (sorted keys, no wall-clock values) except ``created``.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections import Counter

import numpy as np

import lmtrain
from lmtrain.data.split import SPLITS

FORMAT = "lmtrain-data-v1"
PACKAGES = (
    "numpy",
    "pyarrow",
    "sentencepiece",
    "array_record",
    "tensorflow-datasets",
    "ml_collections",
    "grain",
)


def package_versions() -> dict:
    out = {"python": platform.python_version(), "lmtrain": lmtrain.__version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _source_entry(spec: dict, src, docs: int, nbytes: int) -> dict:
    entry = {"name": spec["name"], "kind": spec["kind"], "licence": spec["licence"], "documents_read": docs,
             "bytes_read": nbytes, "files": src.files, "invalid_utf8": dict(sorted(Counter(src.decode_counts).items()))}  # fmt: skip
    if spec["kind"] == "files":
        entry["paths"] = [str(p) for p in spec["paths"]]
    elif spec["kind"] == "tfds":
        entry["tfds"] = {
            "name": spec["tfds_name"],
            "split": spec["split"],
            "data_dir": spec["data_dir"],
        }
    else:
        entry.update(
            root=src.root,
            python=platform.python_version(),
            licence=spec["licence"] if spec["licence"] != "unknown" else "PSF-2.0",
        )
    return entry


def _count(x) -> int:
    """An int as is; for an array of ``dup_of`` indices, how many are set (>= 0)."""
    return int(x) if isinstance(x, (int, np.integer)) else int((np.asarray(x) >= 0).sum())


def _cleaning_stages(cfg, sources, scan) -> dict:
    """The manifest's entries for the per-document stages: errors, decode .. pii."""
    counts = {k: dict(sorted(v.items())) for k, v in scan.counts.items()}
    decode = Counter(counts["decode"])
    for src in sources:
        decode.update(src.decode_counts)
    pii = dict(counts["pii"])
    changed = pii.pop("documents_changed", 0)
    return {
        "errors": {
            "on_error": cfg["on_error"],
            "skipped": dict(sorted(scan.errors.items())),
            "examples": scan.error_examples,
        },  # fmt: skip
        "decode": {"policy": cfg["normalize"]["invalid_utf8"], **dict(sorted(decode.items()))},
        "markup": {"enabled": cfg["markup"]["enabled"], **counts["markup"]},
        "normalize": {"enabled": cfg["normalize"]["enabled"], **counts["normalize"]},
        "quality": {
            "enabled": cfg["quality"]["enabled"],
            "dropped": counts["quality"],
            "dropped_total": int(sum(counts["quality"].values())),
        },  # fmt: skip
        "pii": {
            "enabled": cfg["pii"]["enabled"],
            "replacements": dict(sorted(pii.items())),
            "replacements_total": int(sum(pii.values())),
            "documents_changed": int(changed),
        },  # fmt: skip
    }


def build_manifest(cfg, sources, docs_read, bytes_read, scan, exact, near, lsh_stats, split_ids,
                   contamination, dropped, tok, tok_info, indexes, per_split, per_source) -> dict:  # fmt: skip
    d = cfg["dedup"]
    n_exact, n_near = _count(exact), _count(near)
    licences: Counter = Counter()
    by_source: dict = {}
    for (src, lic, split), n in sorted(per_source.items()):
        licences[lic] += n
        by_source.setdefault(src, {s: 0 for s in SPLITS})[split] = n
    stages = {
        "read": {"documents": int(sum(docs_read.values())), "bytes": int(sum(bytes_read.values()))},
        **_cleaning_stages(cfg, sources, scan),
        "cleaned": {"documents": int(scan.n), "chars": int(np.sum(scan.chars))},
        "dedup": {
            "exact": d["exact"],
            "near": d["near"],
            "exact_duplicates": n_exact,
            "near_duplicates": n_near,
            "threshold": d["threshold"],
            "num_perm": d["num_perm"],
            "shingle_words": d["shingle_words"],
            **lsh_stats,
        },  # fmt: skip
        "split": {
            "method": cfg["split"]["method"],
            "documents": {
                s: int(split_ids[s]) if isinstance(split_ids, dict) else int((split_ids == i).sum())
                for i, s in enumerate(SPLITS)
            },
        },  # fmt: skip
        "contamination": {
            "ngram": cfg["contamination"]["ngram"],
            "drop": cfg["contamination"]["drop"],
            "train_documents_dropped": len(dropped),
            "eval_sets": contamination,
        },  # fmt: skip
    }
    splits = {}
    for s in SPLITS:
        splits[s] = {"documents": int(per_split[s]["documents"]), "chars": int(per_split[s]["chars"]),
                     "tokens": int(per_split[s]["tokens"]), "index": indexes[s]}  # fmt: skip
    return {
        "format": FORMAT,
        "created": None,
        "seed": cfg["seed"],
        "config": cfg,
        "versions": package_versions(),
        "sources": [
            _source_entry(spec, src, docs_read[spec["name"]], bytes_read[spec["name"]])
            for spec, src in zip(cfg["sources"], sources)
        ],  # fmt: skip
        "stages": stages,
        "flow": {
            "read": stages["read"]["documents"],
            "after_cleaning": int(scan.n),
            "after_exact_dedup": int(scan.n - n_exact),
            "after_near_dedup": int(scan.n - n_exact - n_near),
            "after_contamination": int(scan.n - n_exact - n_near - len(dropped)),
            "written": int(sum(per_split[s]["documents"] for s in SPLITS)),
        },
        "licences": dict(sorted(licences.items())),
        "documents_by_source": by_source,
        "tokenizer": {**tok_info, "dir": "tokenizer"},
        "splits": splits,
        "eos_id": int(tok.eos_id),
        "vocab_size": int(tok.vocab_size),
    }
