"""``DATASHEET.md``: a readable account of a prepared dataset, rendered from its manifest.

Follows the questions of Gebru et al. 2021, *Datasheets for Datasets* (composition, collection,
preprocessing, uses, distribution) as far as a pipeline can answer them; the rest is left for the
dataset's owner to fill in. Deterministic: rendered before the manifest's ``created`` is set.
"""

from __future__ import annotations

from pathlib import Path


def _table(rows: list[tuple], head: tuple) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _counts(d: dict) -> str:
    items = [
        (k, v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return ", ".join(f"{k}: {v:,}" for k, v in items) if items else "none"


def render(m: dict) -> str:
    st, cfg, tok = m["stages"], m["config"], m["tokenizer"]
    out = ["# Datasheet", ""]
    out += ["Prepared by `lmtrain data prepare` (format `{}`, seed {}). Machine-readable details, "
            "hashes and the resolved config are in `manifest.json`.".format(m["format"], m["seed"]), ""]  # fmt: skip
    out += _composition(m)
    out += _preprocessing(m, st, cfg)
    out += _contamination(st["contamination"])
    out += _tokenizer(tok)
    out += _uses()
    return "\n".join(out)


def _composition(m: dict) -> list[str]:
    """Sources, splits and licences."""
    out: list[str] = []
    out += ["## Composition", ""]
    rows = []
    for s in m["sources"]:
        where = s.get("root") or ", ".join(s.get("paths", [])) or str(s.get("tfds"))
        rows.append(
            (
                s["name"],
                s["kind"],
                s["licence"],
                len(s["files"]),
                f"{s['documents_read']:,}",
                f"{s['bytes_read']:,}",
                where,
            )
        )
    out += [
        _table(
            rows, ("source", "kind", "licence", "files", "documents read", "bytes read", "location")
        ),
        "",
    ]
    rows = [(s, f"{v['documents']:,}", f"{v['chars']:,}", f"{v['tokens']:,}", len(v["index"]["shards"]))
            for s, v in m["splits"].items()]  # fmt: skip
    out += [
        _table(rows, ("split", "documents", "characters", "tokens (without EOS)", "shards")),
        "",
    ]
    out += ["Documents written per licence: " + _counts(m["licences"]) + ".", ""]
    return out


def _preprocessing(m: dict, st: dict, cfg: dict) -> list[str]:
    """What each stage of the pipeline did."""
    out: list[str] = []
    out += [
        "## Preprocessing",
        "",
        "Documents through the pipeline: "
        + " → ".join(f"{k} {v:,}" for k, v in m["flow"].items())
        + ".",
        "",
    ]
    err = st["errors"]
    out += [f"- **Bad input** (on_error={err['on_error']}): skipped {_counts(err['skipped'])}."]
    out += [
        f"- **Decoding** (invalid UTF-8 policy `{st['decode']['policy']}`): {_counts(st['decode'])}."
    ]
    out += [f"- **Markup to text** (enabled={st['markup']['enabled']}): {_counts(st['markup'])}."]
    out += [
        f"- **Normalisation** (NFC, control characters, whitespace; enabled={st['normalize']['enabled']}): {_counts(st['normalize'])}."
    ]
    q = st["quality"]
    out += [
        f"- **Quality filters** (Gopher/C4 heuristics; enabled={q['enabled']}): dropped {q['dropped_total']:,} — {_counts(q['dropped'])}."
    ]
    p = st["pii"]
    out += [f"- **PII scrubbing** (typed placeholders; enabled={p['enabled']}): {p['replacements_total']:,} replacements "
            f"in {p['documents_changed']:,} documents — {_counts(p['replacements'])}."]  # fmt: skip
    d = st["dedup"]
    out += [f"- **Deduplication**: {d['exact_duplicates']:,} exact and {d['near_duplicates']:,} near duplicates removed "
            f"(MinHash {d['num_perm']} permutations, {d['shingle_words']}-word shingles, Jaccard >= {d['threshold']}, "
            f"LSH {d['bands']} bands x {d['rows']} rows)."]  # fmt: skip
    sp = st["split"]
    out += [f"- **Split** by `{sp['method']}` (train {cfg['split']['train']}, validation {cfg['split']['validation']}, "
            f"test {cfg['split']['test']}); no document is in two splits."]  # fmt: skip
    return out


def _contamination(c: dict) -> list[str]:
    """Overlap of the train split with the evaluation sets."""
    out: list[str] = []
    if c["eval_sets"]:
        out += [
            "",
            f"## Contamination ({c['ngram']}-gram overlap with the train split; drop={c['drop']})",
            "",
        ]
        rows = [(e["name"], e["examples_checked"], e["contaminated_examples"], e["contaminated_fraction"],
                 e["train_documents_overlapping"], e["train_documents_dropped"]) for e in c["eval_sets"]]  # fmt: skip
        out += [
            _table(
                rows,
                (
                    "eval set",
                    "examples checked",
                    "contaminated",
                    "fraction",
                    "train docs overlapping",
                    "dropped",
                ),
            )
        ]
    else:
        out += ["- **Contamination**: no evaluation sets were given (`contamination.eval_sets`)."]
    return out


def _tokenizer(tok: dict) -> list[str]:
    """The tokenizer: kind, vocabulary, where it came from."""
    out: list[str] = []
    out += ["", "## Tokenizer", ""]
    how = (
        f"loaded from `{tok['loaded_from']}`"
        if "loaded_from" in tok
        else (
            f"trained on {tok.get('trained_on_documents', 0):,} train documents ({tok.get('trained_on_chars', 0):,} characters)"
        )
    )
    out += [f"`{tok['kind']}`{' ' + tok['model_type'] if 'model_type' in tok else ''}, vocabulary {tok['vocab_size']:,}, "
            f"{how}; fingerprint `{tok['fingerprint'][:16]}…`. Characters per token on validation: "
            f"{tok['chars_per_token_validation']}.", ""]  # fmt: skip
    return out


def _uses() -> list[str]:
    """What the data cannot promise."""
    out: list[str] = []
    out += ["## Uses and limitations", "",
            "- PII scrubbing is pattern-based: names, postal addresses and free-form personal details are not detected.",
            "- Quality filters are heuristics tuned for prose (or relaxed for code); they remove some good text and keep some bad.",
            "- Near-duplicate removal keeps the earliest document of each cluster in corpus order.",
            "- Licences are as declared in the config per source; check them before redistribution.",
            "- Intended uses, collection process and maintenance: _to be filled in by the dataset owner._", ""]  # fmt: skip
    return out


def write_datasheet(path: str | Path, manifest: dict) -> None:
    Path(path).write_text(render(manifest), encoding="utf-8")
