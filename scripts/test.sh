#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the whole test suite, kernels under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
# every skip but a CUDA-only test is a failure: a missing part cannot give a green run (tests/conftest.py)
export ROTKV_STRICT_SKIPS=1
# One pytest-xdist worker per CPU (at most 4; ROTKV_TEST_WORKERS overrides, 0 = one process), whole files per
# worker, the long ones first (tests/conftest.py splits the cores between the workers).
workers="${ROTKV_TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')}"
parallel=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
# no .pytest_cache: a run leaves the checkout as it found it (CI runs on a clean clone)
exec .venv/bin/python -m pytest -ra -p no:cacheprovider "${parallel[@]}" "$@"
