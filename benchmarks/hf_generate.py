"""transformers decoding with a RotateKV cache against DynamicCache and QuantizedCache, side by side in one run.

    python benchmarks/hf_generate.py                                  # 2K context, batch 1, 4 decode steps
    python benchmarks/hf_generate.py --contexts 2048,8192,16384 --batches 1,8 --decode-steps 16 --json rows.json

For each context length and batch size the bundled SmolLM2-135M-Instruct reads ``context`` tokens of WikiText-2
(test split; each row of a batch its own stretch) and then decodes ``--decode-steps`` tokens teacher-forced (the
text's next tokens are fed), so every cache sees the same tokens and the continuation's perplexity measures what
the cache's quantization costs. Per cache:

- ``cache_bytes``: every tensor the cache object holds after the last step, found by walking its attributes
  (distinct storages; views count once); ``cache_bytes_ratio_to_dynamic`` against the DynamicCache row (the model's
  dtype, bf16 by default);
- ``rss_growth_mb``: the process's resident memory after the decode minus before the cache was made (a rough
  figure: the allocator keeps freed pages; the prefill's activations are freed before it is read);
- ``decode_tokens_per_s``: ``batch * decode_steps`` over the decode steps' wall time (the prefill not counted);
- ``ppl``: ``exp`` of the mean negative log-likelihood of the decoded tokens.

Caches: ``dynamic``; ``quanto2/4`` and ``hqq2/4``: transformers' ``QuantizedCache`` (backends optimum-quanto and
HQQ, ``pip install -e .[bench]``); a backend that does not install or run here gives a row with its error.
QuantizedCache attends over the full-precision K/V during the prefill and quantizes them afterwards, so its state
after a prefill is the DynamicCache prefill's K/V passed through its ``update``: the run does exactly that
(one prefill for the three kinds) rather than repeat an identical forward. ``rotkv2/4``: :mod:`rotkv_vllm.hf_cache`
with the ``--kv-cache-dtype`` preset of that name (its bits and full-precision recent window of 4 tokens, 256-token
pages; calibrated once on the bundled calibration text), which attends over its packed pages from the prefill on, so
it runs its own prefill.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
import traceback

import torch

CACHES = ("dynamic", "quanto2", "quanto4", "hqq2", "hqq4", "rotkv2", "rotkv4")


def held_bytes(obj, skip=()) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (attributes, lists, tuples, dicts)."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen or any(x is s for s in skip):
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            # quanto's QTensor subclasses hold their data in attributes; a plain tensor in its storage
            if type(x) is torch.Tensor or isinstance(x, torch.nn.Parameter):
                st = x.untyped_storage()
                found[st.data_ptr()] = max(found.get(st.data_ptr(), 0), st.nbytes())
                continue
            stack.extend(v for v in vars(x).values())
            for name in getattr(x, "__tensor_flatten__", lambda: ([], None))()[0]:
                stack.append(getattr(x, name))
            continue
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            stack.extend(vars(x).values())
    return sum(found.values())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def token_rows(tok, n_rows: int, length: int) -> torch.Tensor:
    from rotkv_data import data_path

    ids = tok(data_path("wikitext2_test.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    need = n_rows * length
    if ids.numel() < need:
        ids = ids.repeat(math.ceil(need / ids.numel()))
    return ids[:need].view(n_rows, length)


@torch.no_grad()
def decode(model, cache, last_logits: torch.Tensor, cont: torch.Tensor) -> tuple[float, float]:
    """Feed ``cont [B, n]`` one column at a time; (seconds, mean NLL of each fed token)."""
    nll, logits = [], last_logits
    t0 = time.perf_counter()
    for i in range(cont.shape[1]):
        nll.append(torch.nn.functional.cross_entropy(logits.float(), cont[:, i], reduction="none"))
        logits = model(cont[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1]
    return time.perf_counter() - t0, float(torch.cat(nll).mean())


def run_point(model, tok, calib, context: int, batch: int, steps: int, caches: list[str]) -> list[dict]:
    from transformers import DynamicCache, QuantizedCache

    from rotkv_vllm.hf_cache import rotkv_cache

    rows_ids = token_rows(tok, batch, context + steps)
    ctx, cont = rows_ids[:, :context], rows_ids[:, context:]
    rows = []
    # One full-precision prefill: the DynamicCache row and the QuantizedCache rows' prefill state.
    r0 = rss_mb()
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        last = model(ctx, past_key_values=dyn, use_cache=True).logits[:, -1]
    prefill_kv = [(layer.keys.clone(), layer.values.clone()) for layer in dyn.layers]
    for name in caches:
        row = {"cache": name, "context": context, "batch": batch, "decode_steps": steps}
        try:
            gc.collect()
            r_before = rss_mb()
            if name == "dynamic":
                cache = dyn
                r_before = r0
                secs, nll = decode(model, cache, last, cont)
                held = held_bytes(cache)
            elif name.startswith(("quanto", "hqq")):
                backend, bits = name[:-1], int(name[-1])
                cache = QuantizedCache(backend=backend, config=model.config, nbits=bits)
                for i, (k, v) in enumerate(prefill_kv):
                    cache.update(k.clone(), v.clone(), i)
                secs, nll = decode(model, cache, last, cont)
                held = held_bytes(cache)
            else:
                # the --kv-cache-dtype preset (its bits and recent window of 4), as vLLM stores it
                with rotkv_cache(model, calib, kv_cache_dtype=name) as cache:
                    with torch.no_grad():
                        first = model(ctx, past_key_values=cache, use_cache=True).logits[:, -1]
                    gc.collect()
                    secs, nll = decode(model, cache, first, cont)
                held = cache.quantized_nbytes()
                assert held == held_bytes(cache, skip=(cache.runtime, cache.model_config, cache._rotary))
                row["attention_impl"] = cache.attention_impl
            row.update(cache_bytes=held, rss_growth_mb=round(rss_mb() - r_before, 1),
                       decode_tokens_per_s=round(batch * steps / secs, 2), ppl=round(math.exp(nll), 3))
            del cache
        except Exception as e:  # a backend that does not install or run here: a failing row, with why
            row.update(cache_bytes=None, rss_growth_mb=None, decode_tokens_per_s=None, ppl=None,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["cache_bytes"] for r in rows if r["cache"] == "dynamic"), None)
    for r in rows:
        r["cache_bytes_ratio_to_dynamic"] = (round(r["cache_bytes"] / base, 4)
                                             if base and r["cache_bytes"] is not None else None)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048", help="comma-separated context lengths (tokens)")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes")
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--caches", default=",".join(CACHES))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--calib-sequences", type=int, default=4, help="calibration chunks of 512 tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows as a JSON list here")
    args = ap.parse_args(argv)
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    bad = [c for c in caches if c not in CACHES]
    if bad:
        raise ValueError(f"--caches: unknown {bad}; choose from {CACHES}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotkv_data import data_path
    from rotkv_vllm.bundled_model import ensure_smollm2
    from rotkv_vllm.calibration import calibrate
    from rotkv_vllm.demo import serving_config

    folder = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    calib = calibrate(model, tok, serving_config(2), text_file=data_path("calib_wikitext2_valid.txt"),
                      num_sequences=args.calib_sequences, seq_len=512, progress=False)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            rows += run_point(model, tok, calib, context, batch, args.decode_steps, caches)
    cols = ("cache", "context", "batch", "cache_bytes", "cache_bytes_ratio_to_dynamic", "rss_growth_mb",
            "decode_tokens_per_s", "ppl")
    print(f"\nSmolLM2-135M-Instruct ({args.dtype}), {args.decode_steps} teacher-forced decode steps, "
          f"torch threads {torch.get_num_threads()}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols) + (f" | FAILED: {r['error']}" if "error" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
