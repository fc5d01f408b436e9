"""A directory of mixed raw files: .txt, .md, .html, .jsonl(.gz) and .parquet, one licence.

    get_config('/path/to/raw_dir')   # or $LMTRAIN_RAW_DIR, else data/raw under the repository

Text and Markdown/HTML files are one document each (markup converted to text, titles, lists and
code kept); JSONL/Parquet rows are documents (``text`` field). Prose quality filters (Gopher
values), PII scrubbing, exact + near dedup, a 90/5/5 hash split, SentencePiece unigram 8000.
``on_error='skip'``: a bad line or file is counted in the manifest instead of stopping the run.
"""

import os
from pathlib import Path

from lmtrain.data.prepare_config import default_config, source

REPO = Path(__file__).resolve().parents[2]


def get_config(path: str | None = None):
    path = path or os.environ.get("LMTRAIN_RAW_DIR") or str(REPO / "data" / "raw")
    c = default_config()
    c.sources = (source(name="raw", paths=(path,), licence="CC-BY-4.0", text_field="text"),)
    c.on_error = "skip"
    c.split.train, c.split.validation, c.split.test = 0.9, 0.05, 0.05
    c.tokenizer.model_type = "unigram"
    c.tokenizer.vocab_size = 8000
    return c
