"""Where the time of a memory-limited serving run goes: ``benchmarks.vllm_serving``'s memory-limited run (all
requests submitted at once through a small cache) with vLLM's scheduler observed, each dtype in its own process.

    python -m benchmarks.serving_trace [--dtypes auto,rotkv2] [--free-attention] [--prompt-len 64]
                                       [--gen-len 192] [--gen-spread 0.5] [--requests 96] [--small-kv-mib 32]
                                       [--json out.json]

Per run it prints the run cut into tenths of its engine steps (mean running and waiting requests, tokens
scheduled a step: one per decoding request plus prefill, recomputation after a preemption included; the cache's
usage; milliseconds a step) and one summary row per run: generated tokens per second and its ratio to ``auto``,
preemptions, mean running requests, milliseconds a step. ``--free-attention`` adds, for each rotkv dtype, a run
whose fused attention op returns at once (its output is whatever the buffer held, so the text is garbage; the
generation lengths are fixed, so the work is not; the write, the ring reads and the rest of the model still
run): the throughput a free attention kernel would leave, the bound on what a faster kernel can gain.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its scheduler can be observed. vLLM binds
no threads there, so its worker would compute on every core, while the multiprocess engine that ``vllm_serving``
measures (and ``vllm serve`` runs) binds its worker's OpenMP threads to the cores it does not keep for the
scheduler and front end (one of two on a 2-core machine): ``--threads`` (default: that count,
``engine_runs.mp_worker_cpus``) sets the in-process worker's threads to match, ``--threads 0`` leaves torch's
default. The front end then shares the worker's thread instead of running beside it, so compare ratios, not
tokens per second, with ``vllm_serving``. ``--json PATH`` writes every row (``kind`` ``"run"`` or ``"tenth"``)
as a JSON list of objects.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pathlib import Path

from benchmarks.engine_runs import auto_first, model_folder, mp_worker_cpus, run_worker
from benchmarks.vllm_serving import add_workload_args, gen_lengths, workload_prompts
from rotkv_vllm.bundled_model import BUNDLED_MODELS

# per-step figures a tenth averages, in the order of a trace entry after its time
STEP_MEANS = ("running", "waiting", "scheduled_tokens", "cache_usage")


def _observe_scheduler(trace: list, counts: dict) -> None:
    """Record ``(time, running, waiting, scheduled tokens, cache usage)`` after every ``Scheduler.schedule`` and
    count ``_preempt_request`` calls (vLLM 0.32's v1 scheduler; anything else raises rather than measure
    nothing)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    for name in ("schedule", "_preempt_request"):
        if not callable(getattr(Scheduler, name, None)):
            raise RuntimeError(f"vllm.v1.core.sched.scheduler.Scheduler.{name} is gone: this benchmark reads vLLM "
                               "0.32's scheduler")
    schedule, preempt = Scheduler.schedule, Scheduler._preempt_request

    def observed_schedule(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        trace.append((time.perf_counter(), len(self.running), len(self.waiting), out.total_num_scheduled_tokens,
                      self.kv_cache_manager.usage))
        return out

    def counted_preempt(self, *args, **kwargs):
        counts["preemptions"] += 1
        return preempt(self, *args, **kwargs)

    Scheduler.schedule, Scheduler._preempt_request = observed_schedule, counted_preempt


def _free_attention() -> None:
    """Make the fused CPU attention op of every layer return at once (``--free-attention``)."""
    from rotkv_kernels.rotkv_paged_cpu import CpuLayerKernels

    def attend(self, query, records, block_tables, seq_lens, query_start_loc, sinks, out, **window):
        return out

    CpuLayerKernels.attend = attend


def _worker(job: dict) -> dict:
    """Runs in its own process: one in-process engine, one memory-limited run, its trace."""
    import torch

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the engine takes kv_cache_memory_bytes
    trace: list = []
    counts = {"preemptions": 0}
    _observe_scheduler(trace, counts)
    if job["free_attention"]:
        _free_attention()
    if job["threads"]:
        torch.set_num_threads(job["threads"])  # before the engine: its CPU worker disables set_num_threads
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    p_len = job["prompt_len"]
    lens = gen_lengths(job["requests"], job["gen_len"], job["gen_spread"])
    llm = LLM(model=job["model"], enforce_eager=True, seed=0, enable_prefix_caching=False,
              kv_cache_dtype=job["dtype"], max_model_len=p_len + max(lens),
              kv_cache_memory_bytes=job["small_kv_mib"] << 20)

    def prompts(n: int, salt: int) -> list:  # the same prompts as vllm_serving's memory-limited run
        return [TokensPrompt(prompt_token_ids=ids) for ids in workload_prompts(n, salt, p_len)]

    llm.generate(prompts(1, 99), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    trace.clear()
    counts["preemptions"] = 0
    sps = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts(len(lens), 7), sps, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == lens
    steps = [(t - t0, *rest) for t, *rest in trace]
    return {"seconds": seconds, "generated_tokens": sum(lens), "preemptions": counts["preemptions"],
            "threads": torch.get_num_threads(),
            "steps": steps, "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
            "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}


def tenths(steps: list, end: float) -> list[dict]:
    """The run cut into tenths of its steps: per tenth the means of ``running``, ``waiting``,
    ``scheduled_tokens`` and ``cache_usage`` over its steps and ``ms_per_step`` = the time from its first step
    to the next tenth's first (to ``end`` for the last) / its steps.

    Args:
        steps: ``[(seconds since the start, running, waiting, scheduled tokens, usage in [0, 1])]`` per step.
        end: seconds from the start to the end of the run.
    """
    n = len(steps)
    if n < 10:
        raise ValueError(f"steps: {n} steps, need at least 10 to cut into tenths")
    rows = []
    for k in range(10):
        lo, hi = k * n // 10, (k + 1) * n // 10
        part = steps[lo:hi]
        stop = steps[hi][0] if hi < n else end
        rows.append({"tenth": k, "start_s": part[0][0],
                     **{name: sum(s[i + 1] for s in part) / len(part) for i, name in enumerate(STEP_MEANS)},
                     "ms_per_step": 1e3 * (stop - part[0][0]) / len(part)})
    return rows


def _run(job: dict) -> dict:
    return run_worker("benchmarks.serving_trace", job)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2",
                    help=f"a calibrated model folder or one of {', '.join(BUNDLED_MODELS)}")
    ap.add_argument("--dtypes", default="auto,rotkv2")
    ap.add_argument("--free-attention", action="store_true",
                    help="add a run per rotkv dtype with the fused attention op returning at once")
    ap.add_argument("--threads", type=int, default=None,
                    help="the in-process worker's threads (default: the cores vLLM's multiprocess engine binds its "
                         "worker to; 0: torch's default)")
    add_workload_args(ap)
    ap.add_argument("--json", help="write the rows as a JSON list of objects")
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return []
    if args.threads is None:
        args.threads = len(mp_worker_cpus())
    elif args.threads < 0:
        raise ValueError(f"--threads={args.threads}: expected >= 0")

    model = model_folder(args.model)
    gen_lengths(args.requests, args.gen_len, args.gen_spread)  # checks the arguments
    dtypes = auto_first(args.dtypes)
    runs = [(d, False) for d in dtypes]
    if args.free_attention:
        runs += [(d, True) for d in dtypes if d.startswith("rotkv")]
    rows, base = [], None
    for dtype, free in runs:
        job = dict(model=model, dtype=dtype, free_attention=free, threads=args.threads, prompt_len=args.prompt_len,
                   gen_len=args.gen_len, gen_spread=args.gen_spread, requests=args.requests,
                   small_kv_mib=args.small_kv_mib)
        r = _run(job)
        variant = "free attention" if free else ""
        if "error" in r:
            rows.append({"kind": "run", "kv_cache_dtype": dtype, "variant": variant, "error": r["error"]})
            print(f"[{dtype} {variant}] failed: {r['error']}", flush=True)
            continue
        steps = r["steps"]
        tok_s = r["generated_tokens"] / r["seconds"]
        if dtype == "auto" and not free:
            base = tok_s
        run = {"kind": "run", "kv_cache_dtype": dtype, "variant": variant, "error": None,
               "block_size": r["block_size"], "num_blocks": r["num_blocks"], "seconds": r["seconds"],
               "generated_tokens": r["generated_tokens"], "tokens_per_s": tok_s,
               "tokens_per_s_ratio": tok_s / base if base else None, "preemptions": r["preemptions"],
               "threads": r["threads"],
               "steps": len(steps), "mean_running": sum(s[1] for s in steps) / len(steps),
               "ms_per_step": 1e3 * r["seconds"] / len(steps)}
        rows.append(run)
        print(f"\n[{dtype}{' ' + variant if variant else ''}] {len(steps)} steps, {r['num_blocks']} blocks of "
              f"{r['block_size']} tokens")
        print(f"{'tenth':>6}{'start s':>9}{'running':>9}{'waiting':>9}{'tokens/step':>13}{'usage':>7}{'ms/step':>9}")
        for t in tenths(steps, r["seconds"]):
            rows.append({"kind": "tenth", "kv_cache_dtype": dtype, "variant": variant, **t})
            print(f"{t['tenth']:>6}{t['start_s']:>9.1f}{t['running']:>9.1f}{t['waiting']:>9.1f}"
                  f"{t['scheduled_tokens']:>13.1f}{t['cache_usage']:>7.2f}{t['ms_per_step']:>9.1f}", flush=True)
    threads = f"{args.threads} worker threads" if args.threads else "torch's default threads"
    print(f"\n{Path(model).name}, in-process vLLM CPU engine (eager, {threads}): {args.requests} requests of "
          f"{args.prompt_len} + {args.gen_len} (spread {args.gen_spread}) tokens through {args.small_kv_mib} MiB")
    print(f"{'dtype':<22}{'tok/s':>9}{'x auto':>8}{'preempt':>9}{'running':>9}{'ms/step':>9}{'steps':>7}")
    for r in rows:
        if r["kind"] != "run":
            continue
        name = r["kv_cache_dtype"] + (f" ({r['variant']})" if r["variant"] else "")
        if r["error"]:
            print(f"{name:<22}  failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s_ratio']:.2f}" if r["tokens_per_s_ratio"] else "-"
        print(f"{name:<22}{r['tokens_per_s']:>9.1f}{ratio:>8}{r['preemptions']:>9}{r['mean_running']:>9.1f}"
              f"{r['ms_per_step']:>9.1f}{r['steps']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
