#!/usr/bin/env bash
# The test suite on CPU with 8 emulated devices; creates .venv with the dev and hf extras if needed.
# Extra arguments go to pytest (e.g. tools/test.sh tests/unit/model/test_model.py -k causality).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import pytest, transformers, libtpu, apache_beam, lm_eval, accelerate, wandb, prometheus_client" 2>/dev/null; then
  echo "== creating .venv and installing lmtrain[dev,hf,tpu,beam,eval,wandb] (a few minutes the first time)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,hf,tpu,beam,eval,wandb]'
fi
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q -rs "$@"  # -rs: why a test was skipped
