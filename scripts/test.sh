#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the whole test suite, kernels under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
# every skip but a CUDA-only test is a failure: a missing part cannot give a green run (tests/conftest.py)
export ROTKV_STRICT_SKIPS=1
# no .pytest_cache: a run leaves the checkout as it found it (CI runs on a clean clone)
exec .venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
