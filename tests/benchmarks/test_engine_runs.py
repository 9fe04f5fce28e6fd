"""The benchmarks' engine runner: a failing engine process becomes a row with its error line, not a crash."""

from __future__ import annotations

import os

from benchmarks.engine_runs import (DEFAULT_KV_DTYPES, auto_first, failure_reason, model_folder, mp_worker_cpus,
                                    run_worker)


def test_failure_reason_picks_the_last_error_line():
    stderr = "INFO starting\nTraceback (most recent call last):\n  File x\nValueError: kv_cache_dtype nvfp4 needs CUDA\n"
    assert failure_reason("", stderr, 1) == "ValueError: kv_cache_dtype nvfp4 needs CUDA"
    assert failure_reason("last words\n", "", 3) == "last words"
    assert failure_reason("", "", -9) == "exit status -9"
    assert len(failure_reason("", "RuntimeError: " + "x" * 1000, 1)) == 300
    # a worker's segfault (torch's handler, as vLLM's CPU cache write printed it) wins over the engine's
    # "cancelled", which only says the worker is gone
    crash = ("!!!!!!! Segfault encountered !!!!!!!\n"
             '  File "./signal/../sysdeps/unix/sysv/linux/x86_64/libc_sigaction.c", line 0, in 0x00007fe81fc5a04f\n'
             '  File "/tmp/vllm/csrc/cpu/cpu_attn_vec.hpp", line 305, in reshape_and_cache(...)\n'
             "ERROR [core.py:1512] RuntimeError: cancelled\n")
    assert failure_reason("", crash, 1) == ('segfault at "/tmp/vllm/csrc/cpu/cpu_attn_vec.hpp", line 305, in '
                                            "reshape_and_cache(...)")
    assert failure_reason("", "!!!!!!! Segfault encountered !!!!!!!\nRuntimeError: cancelled\n", 1) == "segfault"


def test_run_worker_returns_the_result_or_the_error():
    ok = run_worker("tests.benchmarks.engine_echo", {"x": [1, 2]}, timeout=120)
    assert ok == {"echo": {"x": [1, 2]}}
    bad = run_worker("tests.benchmarks.engine_echo", {"fail": "no engine for this dtype"}, timeout=120)
    assert bad == {"error": "ValueError: no engine for this dtype"}
    missing = run_worker("benchmarks.no_such_module", {}, timeout=120)
    assert "No module named benchmarks.no_such_module" in missing["error"]


def test_default_dtypes_put_auto_first_and_each_once():
    assert DEFAULT_KV_DTYPES[0] == "auto" and len(set(DEFAULT_KV_DTYPES)) == len(DEFAULT_KV_DTYPES)
    assert {"rotkv2", "fp8", "int4_per_token_head", "turboquant_3bit_nc"} <= set(DEFAULT_KV_DTYPES)


def test_auto_first_and_model_folder():
    assert auto_first("rotkv2,auto,fp8") == ["auto", "rotkv2", "fp8"]
    assert auto_first("rotkv2") == ["auto", "rotkv2"]
    assert model_folder("/some/folder") == "/some/folder"


def test_mp_worker_cpus_follows_vllms_binding(monkeypatch):
    allowed = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    cpus = mp_worker_cpus()
    # auto: some of the allowed CPUs, and on more than one core at least one kept for the scheduler
    assert cpus and set(cpus) <= set(allowed)
    if len(allowed) > 1:
        assert len(cpus) < len(allowed)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(allowed[0]))
    assert mp_worker_cpus() == [allowed[0]]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert mp_worker_cpus() == []
