"""One vLLM engine per process for the serving and accuracy benchmarks, and the KV-cache dtypes they compare.

vLLM 0.32 ships quantized KV caches of its own; a RotateKV figure means something only beside them. Each engine
runs in a fresh process (``python -m MODULE --worker JOB``, the module prints ``RESULT {json}``), so a dtype
that fails to start or crashes mid-run becomes a row that says so instead of ending the benchmark, and no
engine inherits another's state.
"""

from __future__ import annotations

import json
import subprocess
import sys

__all__ = ["BUILTIN_KV_DTYPES", "ROTKV_KV_DTYPES", "DEFAULT_KV_DTYPES", "run_worker", "failure_reason",
           "auto_first", "model_folder", "mp_worker_cpus"]

# vLLM 0.32's own cache dtypes other than the model dtype, in order of bits per element (the names of
# vllm.config.cache.CacheDType; MLA-only and NVFP4 layouts are left out). Which of them start on a given
# platform is what the benchmarks measure: a dtype that does not is reported with its error.
BUILTIN_KV_DTYPES = (
    "fp8",
    "fp8_e5m2",
    "int8_per_token_head",
    "fp8_per_token_head",
    "turboquant_k8v4",
    "int4_per_token_head",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
)
ROTKV_KV_DTYPES = ("rotkv2", "rotkv4")
DEFAULT_KV_DTYPES = ("auto", *BUILTIN_KV_DTYPES, *ROTKV_KV_DTYPES)


def failure_reason(stdout: str, stderr: str, returncode: int) -> str:
    """The most telling line of a failed engine process: where a process segfaulted (torch's handler prints
    ``Segfault encountered`` and the native frames: the first frame past the signal handler), else the last
    ``...Error: ...`` line, else the last line. A worker's segfault comes first because the engine core then
    only reports that its worker is gone (``RuntimeError: cancelled``)."""
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    crash = next((i for i, ln in enumerate(lines) if "Segfault encountered" in ln), None)
    if crash is not None:
        frames = [ln for ln in lines[crash + 1:crash + 6] if ln.startswith("File ") and "sigaction" not in ln]
        why = "segfault" + (f" at {frames[0][len('File '):]}" if frames else "")
    else:
        errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
        why = (errors or lines or [f"exit status {returncode}"])[-1]
    return why if len(why) <= 300 else why[:297] + "..."


def run_worker(module: str, job: dict, timeout: float = 3600) -> dict:
    """Run ``python -m module --worker JSON(job)`` and return its ``RESULT`` object, or ``{"error": reason}``
    when the process fails or times out (the reason is one line taken from its output)."""
    try:
        p = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(job)], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": failure_reason(p.stdout, p.stderr, p.returncode)}


def auto_first(dtypes: str) -> list[str]:
    """``--dtypes`` (comma-separated) as a list that starts with ``auto``, the baseline of every ratio."""
    names = [d for d in dtypes.split(",") if d]
    return ["auto"] + [d for d in names if d != "auto"]


def model_folder(model: str) -> str:
    """``--model``: a bundled model's name (converted and calibrated on first use) or a model folder."""
    from rotkv_vllm.bundled_model import BUNDLED_MODELS

    if model in BUNDLED_MODELS:
        from rotkv_vllm.demo import prepare_bundled

        return str(prepare_bundled(model))
    return model


def mp_worker_cpus() -> list[int]:
    """The CPUs vLLM 0.32's multiprocess engine binds its (single) CPU worker's OpenMP threads to: its
    ``OMPProcessManager`` reads ``VLLM_CPU_OMP_THREADS_BIND`` (``auto``: one logical CPU per physical core of the
    first NUMA node, less the cores it reserves for the scheduler and front end; one of two on a 2-core machine).
    An empty list means ``nobind`` (the worker keeps torch's default threads).

    An in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) binds nothing and computes on every core; a
    benchmark that runs one in place of ``vllm serve`` sets this many threads to see the same compute.

    Raises:
        RuntimeError: vLLM's manager is not the one this reads (another vLLM version).
    """
    from types import SimpleNamespace

    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager

        one_rank = SimpleNamespace(parallel_config=SimpleNamespace(local_world_size=1, data_parallel_rank_local=None,
                                                                   _api_process_count=1), kv_transfer_config=None)
        manager = OMPProcessManager(one_rank)
        return [] if manager.skip_setup else list(manager.cpu_lists[0])
    except (ImportError, AttributeError, TypeError, IndexError) as e:
        raise RuntimeError(f"vLLM's OMPProcessManager changed ({type(e).__name__}: {e}): this reads vLLM 0.32's "
                           "CPU thread binding") from e
