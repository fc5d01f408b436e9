#!/usr/bin/env bash
# One command from a fresh machine (Python 3.11) to a trained model printing samples:
# virtual environment, install, data preparation + tokenizer on the embedded default corpus
# (this Python's standard library), a short pre-training run, samples.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv and installing lmtrain (a few minutes the first time)"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
fi
if [ ! -f data_out/stdlib/manifest.json ]; then
  echo "== data: stdlib sources -> cleaned, deduplicated, PII-scrubbed BPE shards in data_out/stdlib"
  .venv/bin/lmtrain data prepare --config configs/data/default.py --out data_out/stdlib
fi
echo "== training (resumes if runs/quickstart holds checkpoints); extra args are config overrides"
.venv/bin/lmtrain train --config configs/quickstart.py --workdir runs/quickstart "$@"
