"""Tiny Shakespeare, character level: one text file → paragraph-group documents, 90/10 by position.

The nanoGPT recipe cuts one 1.1 MB text at 90%. Splits here are document-level, so the file is
first segmented (``segment='paragraphs'``) into documents of whole speeches of about 2,000
characters; ``split.method='position'`` then puts the first 90% of documents in train and the last
10% in validation — the same cut as nanoGPT's, moved to the nearest speech boundary. The char
tokenizer is trained on the train split (65 characters + 4 specials on the full text).

The file path: ``$LMTRAIN_SHAKESPEARE``, else ``data/tinyshakespeare.txt`` under the repository
(``get_config(path)`` from Python):

    lmtrain data fetch tinyshakespeare
    lmtrain data prepare --config configs/data/shakespeare.py --out data_out/shakespeare

Measured: 498 documents (448 train / 50 validation), 1.01M train / 0.107M validation characters,
1 char per token, 65 characters + 4 specials.
"""

import os
from pathlib import Path

from lmtrain.data.prepare_config import default_config, source

REPO = Path(__file__).resolve().parents[2]


def get_config(path: str | None = None):
    path = (
        path or os.environ.get("LMTRAIN_SHAKESPEARE") or str(REPO / "data" / "tinyshakespeare.txt")
    )
    c = default_config()
    c.sources = (source(name="tinyshakespeare", paths=(path,), licence="public-domain", format="text",
                        segment="paragraphs", segment_chars=2000),)  # fmt: skip
    c.quality.enabled = False  # verse: short lines, few words per line; every speech is wanted
    c.pii.enabled = True
    c.split.method = "position"
    c.split.train, c.split.validation, c.split.test = 0.9, 0.1, 0.0
    c.tokenizer.kind = "char"
    return c
