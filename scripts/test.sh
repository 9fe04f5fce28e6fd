#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the whole test suite, kernels under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec .venv/bin/python -m pytest -ra "$@"
