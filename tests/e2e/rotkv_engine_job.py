"""Runs one offline vLLM engine in its own process for the RotateKV end-to-end tests; prints one JSON line.

    python tests/e2e/rotkv_engine_job.py JOB.json

JOB: {"llm": {LLM(...) keyword arguments}, "env": {...}, "tasks": [...]}; each task is one of
    {"kind": "capacity"}
    {"kind": "ppl", "windows": [[token ids], ...]}                       -> exp(mean NLL of tokens 1..)
    {"kind": "greedy", "prompts": [[ids], ...], "max_new": n, "top": k}  -> token ids, their logprobs (and
                                                                            each step's k best with "top")
    {"kind": "batched", "prompts": [...], "max_new": n}                  -> greedy, and preemptions during it
    {"kind": "prefix_repeat", "prompt": [...], "max_new": n}             -> cold run, warm run, cache hits
A separate process per engine keeps the tests free of engine state and lets each set its environment.
"""

from __future__ import annotations

import json
import math
import os
import sys


def _metric(llm, needle: str) -> float:
    total = 0.0
    for m in llm.get_metrics():
        if needle in m.name and hasattr(m, "value"):
            total += float(m.value)
    return total


def _greedy(llm, prompts, max_new, top: int = 0):
    """Greedy continuations: token ids, their logprobs and, with ``top``, each step's ``top`` best
    ``[token, logprob]`` pairs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True, logprobs=top)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    if not top:
        return ids, lps
    best = [[sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda x: -x[1])[:top]
             for step in o.outputs[0].logprobs] for o in outs]
    return ids, lps, best


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    os.environ.update(job.get("env", {}))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**job["llm"])
    result: dict = {}
    for task in job["tasks"]:
        kind = task["kind"]
        if kind == "capacity":
            cc = llm.llm_engine.vllm_config.cache_config
            result["capacity"] = {"kv_cache_size_tokens": cc.kv_cache_size_tokens, "num_blocks": cc.num_gpu_blocks,
                                  "block_size": cc.block_size, "cache_dtype": cc.cache_dtype}
        elif kind == "ppl":
            ws = task["windows"]
            outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in ws],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
            nll = -sum(o.prompt_logprobs[i][w[i]].logprob for w, o in zip(ws, outs) for i in range(1, len(w)))
            result["ppl"] = math.exp(nll / sum(len(w) - 1 for w in ws))
        elif kind == "greedy":
            got = _greedy(llm, task["prompts"], task["max_new"], task.get("top", 0))
            result["greedy"], result["greedy_logprobs"] = got[:2]
            if task.get("top"):
                result["greedy_top"] = got[2]
        elif kind == "batched":
            before = _metric(llm, "num_preemptions")
            result["batched"], result["batched_logprobs"] = _greedy(llm, task["prompts"], task["max_new"])
            result["preemptions"] = _metric(llm, "num_preemptions") - before
        elif kind == "prefix_repeat":
            h0 = _metric(llm, "prefix_cache_hits")
            cold = _greedy(llm, [task["prompt"]], task["max_new"])
            h1 = _metric(llm, "prefix_cache_hits")
            warm = _greedy(llm, [task["prompt"]], task["max_new"])
            result["cold"], result["cold_logprobs"] = cold[0][0], cold[1][0]
            result["warm"], result["warm_logprobs"] = warm[0][0], warm[1][0]
            result["hits_cold"] = h1 - h0
            result["hits_warm"] = _metric(llm, "prefix_cache_hits") - h1
        else:
            raise ValueError(f"unknown task {kind!r}")
    print("ROTKV_JOB_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
