"""Serving figures of the bundled SmolLM2-135M on vLLM's CPU engine: ``auto`` (bf16) vs vLLM's own quantized
KV caches vs ``rotkv2`` / ``rotkv4``.

    python -m benchmarks.vllm_serving [--model smollm2|gemma3-270m|FOLDER] [--dtypes auto,fp8,...,rotkv2]
                                      [--prompt-len 64] [--gen-len 192] [--gen-spread 0.5] [--small-kv-mib 32]
                                      [--requests 96] [--reps 3] [--json out.json]

The default ``--dtypes`` is ``benchmarks.engine_runs.DEFAULT_KV_DTYPES``: every built-in quantized cache of
vLLM 0.32 beside RotateKV's. A dtype whose engine fails (to start, or during a run) gets a row with ``error``
(the failing line) and no figures.

Per dtype, from one run (each engine in its own process, eager mode, one after the other):
  * capacity: the engine's KV-cache capacity report (tokens) and max concurrency for 2048-token requests
    at ``VLLM_CPU_KVCACHE_SPACE=--kv-space`` GiB;
  * speed at batch 1 and at the largest batch ``auto`` fits in the small cache (``--small-kv-mib``) for
    requests of prompt + generation tokens: prefill tokens/s (requests with one output token) and decode
    tokens/s (the extra time of ``--gen-len`` more tokens); each the median of ``--reps`` timed runs (one run
    moves by 10-20% on a shared 2-core machine);
  * throughput when memory is the limit: ``--requests`` requests through the small cache, generated tokens per
    second of wall time (what fits runs concurrently, the rest waits or is preempted). Request i generates
    ``--gen-len`` x (1 - s + 2 s u_i) tokens (s = ``--gen-spread``, u_i evenly spread over [0, 1) in a
    shuffled order), so requests end at different steps and the scheduler keeps refilling the batch, as a
    server under load does; with s = 0 they all end together, in waves.
The default shape (64 prompt + about 192 generated tokens, 96 requests) is decode-heavy, where the cache's
size limits how many sequences share a step; ``--prompt-len 256 --gen-len 32 --gen-spread 0 --requests 24`` is
the prefill-heavy shape earlier figures used (89% of its tokens are prefill, whose cost no cache changes).
Ratios are to ``auto`` in the same run. ``--json PATH`` writes the rows as a JSON list of objects.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

from pathlib import Path

from benchmarks.engine_runs import DEFAULT_KV_DTYPES, auto_first, model_folder, run_worker
from rotkv_vllm.bundled_model import BUNDLED_MODELS

FIGURES = ("kv_capacity_tokens", "max_concurrency_2048", "block_size", "prefill_tokens_per_s_batch1",
           "decode_tokens_per_s_batch1", "prefill_tokens_per_s", "decode_tokens_per_s", "small_cache_concurrency",
           "memory_limited_tokens_per_s")
RATIOS = ("kv_capacity_tokens", "decode_tokens_per_s_batch1", "decode_tokens_per_s", "memory_limited_tokens_per_s")


def _worker(job: dict) -> dict:
    """Runs in its own process: one engine, the measurements of ``job``."""
    for k, v in job.get("env", {}).items():  # None: unset (vLLM reads an empty value as a broken int)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**job["llm"])
    cc = llm.llm_engine.vllm_config.cache_config
    out = {"kv_capacity_tokens": cc.kv_cache_size_tokens, "max_concurrency": cc.kv_cache_max_concurrency,
           "block_size": cc.block_size, "num_blocks": cc.num_gpu_blocks}
    p_len, g_len = job["prompt_len"], job["gen_len"]

    def prompts(n: int, salt: int) -> list:
        return [TokensPrompt(prompt_token_ids=ids) for ids in workload_prompts(n, salt, p_len)]

    def timed(n: int, max_tokens: int | list[int], salt: int) -> float:
        lens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
        sps = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lens]
        t = time.perf_counter()
        outs = llm.generate(prompts(n, salt), sps, use_tqdm=False)
        dt = time.perf_counter() - t
        assert [len(o.outputs[0].token_ids) for o in outs] == lens
        return dt

    timed(1, 2, salt=99)  # warm-up
    reps = job.get("reps", 1)
    for b in job.get("batches", []):
        # fresh prompts every run (salt), medians of the prefill and full times
        t_prefill = statistics.median(timed(b, 1, salt=100 * i + 2 * b) for i in range(reps))
        t_full = statistics.median(timed(b, 1 + g_len, salt=100 * i + 2 * b + 1) for i in range(reps))
        out[f"prefill_tokens_per_s_b{b}"] = b * p_len / t_prefill
        out[f"decode_tokens_per_s_b{b}"] = b * g_len / max(t_full - t_prefill, 1e-9)
    if job.get("requests"):
        lens = gen_lengths(job["requests"], g_len, job.get("gen_spread", 0.0))
        t = timed(len(lens), lens, salt=7)
        out["memory_limited_tokens_per_s"] = sum(lens) / t
        out["memory_limited_seconds"] = t
    return out


def gen_lengths(n: int, gen_len: int, spread: float) -> list[int]:
    """Generated tokens of the memory-limited run's ``n`` requests: ``gen_len * (1 - spread + 2 * spread * u_i)``
    rounded, with u_i = (k + 0.5) / n for k = 0 .. n - 1 in a fixed shuffled order (golden-ratio stride), so the
    mean is ``gen_len`` up to rounding, the longest ``gen_len * (1 + spread)`` and long and short requests
    arrive mixed."""
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"gen_spread={spread}: expected 0 <= spread < 1")
    if n < 1 or gen_len < 1:
        raise ValueError(f"requests={n}, gen_len={gen_len}: both must be >= 1")
    stride = max(1, round(n * 0.6180339887))
    while math.gcd(stride, n) != 1:
        stride += 1
    return [max(1, round(gen_len * (1 - spread + 2 * spread * ((i * stride) % n + 0.5) / n))) for i in range(n)]


def workload_prompts(n: int, salt: int, prompt_len: int) -> list[list[int]]:
    """Token ids of ``n`` prompts of ``prompt_len`` tokens, distinct across requests and across ``salt`` (no
    prefix-cache reuse between requests or runs)."""
    return [[(1000 + 7919 * (salt * 1000 + i) + 31 * j) % 40000 + 100 for j in range(prompt_len)] for i in range(n)]


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The memory-limited workload's flags (shared with ``benchmarks.serving_trace``)."""
    ap.add_argument("--small-kv-mib", type=int, default=32, help="KV cache (MiB) of the memory-limited runs")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=192, help="generated tokens per request (the mean, with a spread)")
    ap.add_argument("--gen-spread", type=float, default=0.5,
                    help="memory-limited run: generation lengths spread over gen-len x [1 - s, 1 + s] (0: all equal)")
    ap.add_argument("--requests", type=int, default=96, help="requests of the memory-limited run")


def _run(job: dict) -> dict:
    return run_worker("benchmarks.vllm_serving", job)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2",
                    help="a model folder with a RotateKV calibration, or a bundled model converted and calibrated "
                         f"on first use: {', '.join(BUNDLED_MODELS)} (default smollm2)")
    ap.add_argument("--dtypes", default=",".join(DEFAULT_KV_DTYPES))
    ap.add_argument("--kv-space", type=int, default=1, help="GiB of KV cache for the capacity rows")
    add_workload_args(ap)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per speed figure (median)")
    ap.add_argument("--json", help="write the rows as a JSON list of objects")
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return []

    model = model_folder(args.model)
    dtypes = auto_first(args.dtypes)
    lens = gen_lengths(args.requests, args.gen_len, args.gen_spread)  # checks the arguments
    if args.reps < 1:
        raise ValueError(f"--reps={args.reps}: expected >= 1")
    req_len = args.prompt_len + max(lens)
    common = dict(model=model, enforce_eager=True, seed=0, enable_prefix_caching=False)

    # 1. small cache: concurrency at req_len tokens per request, and the memory-limited run.
    small = {}
    for dt in dtypes:
        job = dict(llm=dict(common, kv_cache_dtype=dt, max_model_len=req_len,
                            kv_cache_memory_bytes=args.small_kv_mib << 20),
                   env={"VLLM_CPU_KVCACHE_SPACE": None}, prompt_len=args.prompt_len, gen_len=args.gen_len,
                   requests=args.requests, gen_spread=args.gen_spread)
        small[dt] = _run(job)
        print(f"[{dt}] small cache: {small[dt]}", flush=True)
    if "error" in small["auto"]:
        raise RuntimeError(f"the auto engine failed: {small['auto']['error']}")
    batch = max(1, int(small["auto"]["max_concurrency"]))

    # 2. the capacity report at --kv-space GiB, and speed at batch 1 and at auto's largest batch.
    big = {}
    for dt in dtypes:
        if "error" in small[dt]:
            big[dt] = small[dt]
            continue
        job = dict(llm=dict(common, kv_cache_dtype=dt, max_model_len=2048),
                   env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_space)}, prompt_len=args.prompt_len,
                   gen_len=args.gen_len, batches=sorted({1, batch}), reps=args.reps)
        big[dt] = _run(job)
        print(f"[{dt}] {args.kv_space} GiB: {big[dt]}", flush=True)

    rows = []
    for dt in dtypes:
        b, s = big[dt], small[dt]
        if "error" in b or "error" in s:
            rows.append({"kv_cache_dtype": dt, "error": b.get("error") or s.get("error"), "batch": batch,
                         **{k: None for k in FIGURES}, **{f"{k}_ratio": None for k in RATIOS}})
            continue
        rows.append({
            "kv_cache_dtype": dt,
            "kv_capacity_tokens": b["kv_capacity_tokens"],
            "max_concurrency_2048": b["max_concurrency"],
            "block_size": b["block_size"],
            "prefill_tokens_per_s_batch1": b["prefill_tokens_per_s_b1"],
            "decode_tokens_per_s_batch1": b["decode_tokens_per_s_b1"],
            "batch": batch,
            "prefill_tokens_per_s": b[f"prefill_tokens_per_s_b{batch}"],
            "decode_tokens_per_s": b[f"decode_tokens_per_s_b{batch}"],
            "small_kv_mib": args.small_kv_mib,
            "small_cache_concurrency": s["max_concurrency"],
            "memory_limited_requests": args.requests,
            "memory_limited_generated_tokens": sum(lens),
            "memory_limited_tokens_per_s": s["memory_limited_tokens_per_s"],
        })
    base = rows[0]
    for r in rows:
        if r.get("error") is None:
            r["error"] = None
            for k in RATIOS:
                r[f"{k}_ratio"] = r[k] / base[k]
    print(f"\n{Path(model).name}, vLLM CPU engine (eager); capacity at {args.kv_space} GiB; requests of "
          f"{args.prompt_len} + {args.gen_len} tokens (speed: medians of {args.reps}); batch {batch} = largest auto "
          f"fits in {args.small_kv_mib} MiB at {req_len} tokens; memory-limited: {args.requests} requests of "
          f"{args.prompt_len} + {min(lens)}..{max(lens)} tokens through {args.small_kv_mib} MiB")
    hdr = (f"{'dtype':<20}{'KV tokens':>11}{'x':>7}{'conc@2k':>9}{'pre/s b1':>10}{'dec/s b1':>10}{'x':>7}"
           f"{f'pre/s b{batch}':>11}{f'dec/s b{batch}':>11}{'x':>7}{'conc@small':>11}{'memlim tok/s':>13}{'x':>7}")
    print(hdr)
    for r in rows:
        if r["error"]:
            print(f"{r['kv_cache_dtype']:<20}  failed: {r['error']}")
            continue
        print(f"{r['kv_cache_dtype']:<20}{r['kv_capacity_tokens']:>11,}{r['kv_capacity_tokens_ratio']:>7.2f}"
              f"{r['max_concurrency_2048']:>9.1f}{r['prefill_tokens_per_s_batch1']:>10.0f}"
              f"{r['decode_tokens_per_s_batch1']:>10.1f}{r['decode_tokens_per_s_batch1_ratio']:>7.2f}"
              f"{r['prefill_tokens_per_s']:>11.0f}"
              f"{r['decode_tokens_per_s']:>11.1f}{r['decode_tokens_per_s_ratio']:>7.2f}"
              f"{r['small_cache_concurrency']:>11.1f}{r['memory_limited_tokens_per_s']:>13.1f}"
              f"{r['memory_limited_tokens_per_s_ratio']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
