"""WikiText-2 perplexity of a HALO W8A8 export through the real vLLM engine vs transformers, side by side.

    nice .venv/bin/python benchmarks/halo_vllm_ppl.py --w8a8 /tmp/halo_bench/export/halo2_int8-w8a8 \
        --merged /tmp/halo_bench/export/halo2_int8-merged-bf16 --json halo_vllm_ppl.json

Scores the same ``--chunks`` x ``--seq-len`` token chunks of ``data/wikitext2_test.txt``
(positions 1..L-1 of each chunk) with: vLLM serving the W8A8 checkpoint (offline ``LLM``, eager,
float32, our ``halo`` plugin loaded for the CPU transform path); the same checkpoint in transformers
(:func:`optimum_plugin.halo.load_w8a8`); and, if given, the merged bf16 checkpoint in transformers.
Rows: ``engine``, ``checkpoint``, ``ppl``, ``ratio`` (ppl / the transformers W8A8 ppl), ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from rotkv_data import EVAL_TEXT, data_path

DEFAULT_DATA = data_path(EVAL_TEXT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--w8a8", required=True, help="folder written by save_w8a8")
    p.add_argument("--merged", default=None, help="folder written by save_merged (optional)")
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_plugin.halo import load_w8a8
    from optimum_plugin.halo.data import causal_lm_nll, token_chunks
    from optimum_plugin.halo.vllm_eval import run_vllm_nll

    tok = AutoTokenizer.from_pretrained(a.w8a8)
    chunks = token_chunks(tok, a.data, a.seq_len, max_chunks=a.chunks)
    rows = []

    t0 = time.time()
    v = run_vllm_nll(a.w8a8, chunks, dtype="float32", plugins="halo")
    rows.append(dict(engine=f"vllm ({v['quantization']})", checkpoint="w8a8", ppl=math.exp(v["nll"] / v["tokens"]),
                     tokens=v["tokens"], seconds=time.time() - t0))

    t0 = time.time()
    s, n = causal_lm_nll(load_w8a8(a.w8a8), chunks)
    rows.append(dict(engine="transformers (load_w8a8)", checkpoint="w8a8", ppl=math.exp(s / n), tokens=n,
                     seconds=time.time() - t0))
    if a.merged:
        t0 = time.time()
        m = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32).eval()
        s, n = causal_lm_nll(m, chunks)
        rows.append(dict(engine="transformers", checkpoint="merged bf16 weights", ppl=math.exp(s / n), tokens=n,
                         seconds=time.time() - t0))
    ref = rows[1]["ppl"]
    for r in rows:
        r["ratio"] = r["ppl"] / ref

    print(f"\nWikiText-2 test, {a.chunks} x {a.seq_len} tokens ({rows[0]['tokens']} scored); ratio = ppl / transformers W8A8")
    print(f"{'engine':<38}{'checkpoint':<22}{'ppl':>9}{'ratio':>8}{'seconds':>9}")
    for r in rows:
        print(f"{r['engine']:<38}{r['checkpoint']:<22}{r['ppl']:>9.3f}{r['ratio']:>8.4f}{r['seconds']:>9.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
