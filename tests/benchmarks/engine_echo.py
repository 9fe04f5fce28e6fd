"""A worker for ``test_engine_runs.py``, run from the checkout root as ``python -m tests.benchmarks.engine_echo``:
``--worker JSON`` echoes the job, or raises ``ValueError(job["fail"])`` (what an engine refusing a dtype does)."""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    if "fail" in job:
        raise ValueError(job["fail"])
    print("RESULT " + json.dumps({"echo": job}), flush=True)
