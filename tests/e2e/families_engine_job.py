"""Runs several offline vLLM engines one after another in one process for the model-family tests; prints one
JSON line.

    python tests/e2e/families_engine_job.py JOB.json

JOB: {"engines": [{"name": str, "llm": {LLM(...) keyword arguments}, "env": {...}, "tasks": [...]}, ...]};
each task is one of
    {"kind": "ppl", "windows": [[token ids], ...]}              -> exp(mean NLL of tokens 1.. of each window)
    {"kind": "greedy", "prompts": [[ids], ...], "max_new": n}   -> token ids and their logprobs
Result: {name: {"ppl", "greedy", "greedy_logprobs", "seconds"}} (``seconds``: start-up and tasks of that engine).

One process pays Python's and vLLM's imports once for all the engines of a family (``rotkv_engine_job.py``
starts one engine per process); each engine is shut down before the next starts, and an engine's ``env`` is
set before it starts (its worker processes inherit it) and removed after.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time

from rotkv_engine_job import _greedy


def _run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(**spec["llm"])
    out: dict = {}
    try:
        for task in spec["tasks"]:
            if task["kind"] == "ppl":
                ws = task["windows"]
                res = llm.generate([TokensPrompt(prompt_token_ids=w) for w in ws],
                                   SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
                nll = -sum(o.prompt_logprobs[i][w[i]].logprob for w, o in zip(ws, res) for i in range(1, len(w)))
                out["ppl"] = math.exp(nll / sum(len(w) - 1 for w in ws))
            elif task["kind"] == "greedy":
                out["greedy"], out["greedy_logprobs"] = _greedy(llm, task["prompts"], task["max_new"])
            else:
                raise ValueError(f"unknown task {task['kind']!r}")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    result = {}
    for spec in job["engines"]:
        env = spec.get("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            result[spec["name"]] = _run_engine(spec)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    print("ROTKV_JOB_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
