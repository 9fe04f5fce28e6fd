"""WikiText-2 perplexity of SmolLM2-135M with quantized K/V: every method measured in one run.

    python -m benchmarks.kv_ppl [--tokens 16384] [--window 1024] [--methods fp,kivi2,rotkv2] [--json out.json]

Windows of ``--window`` tokens over the first ``--tokens`` tokens of ``data/wikitext2_test.txt``;
RotateKV is calibrated on ``data/calib_wikitext2_valid.txt`` only (never the evaluation text).
Rows: method, average stored bits per K/V element (scales, zeros and full-precision tokens included,
counted at the end of each window), perplexity, and perplexity / fp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from rotkv_data import data_path
from rotkv_vllm.bundled_model import ensure_smollm2
from rotkv_vllm.calibration import calibrate
from rotkv_vllm.config import RotateKVConfig, config_for_cache_dtype
from rotkv_vllm.reference import KVMethod, KVStats, method_from_name, perplexity

# The paper's recipe on this model's layout: one quantization group per token over the 192-wide rotated
# head group with fp16 scale and zero (2.17 bits), clip 0.8, top-20-activation sinks (at most 4 tokens),
# calibrated channel order (sorted signed means), pre-RoPE grouped-head rotation, per-head value rotation.
PAPER = RotateKVConfig(key_bits=2, value_bits=2, group_size=192, value_group_size=192, scale_format="fp16",
                       center_keys=False, sink_mode="topk", max_sink_tokens=4)


def rotkv_variants() -> dict[str, RotateKVConfig]:
    """Named RotateKV configs: the paper's ablation, then each idea past the paper as its own row."""
    k64 = dict(group_size=64, value_group_size=192, scale_format="fp8")  # 2.25-bit keys, 2.08-bit values
    default2 = config_for_cache_dtype("rotkv2")
    return {
        # the paper's ablation (cumulative, on this model's layout)
        "rotkv2-paper-postrope": dataclasses.replace(PAPER, pre_rope=False, reorder=False, sink_mode="none"),
        "rotkv2-paper-prerope": dataclasses.replace(PAPER, reorder=False, sink_mode="none"),
        "rotkv2-paper-sinks": dataclasses.replace(PAPER, reorder=False),
        "rotkv2-paper": PAPER,
        # past the paper, one idea per row (same 2-bit budget)
        "rotkv2-paper+k64fp8": dataclasses.replace(PAPER, **k64),
        "rotkv2-paper+k64fp8-noreorder": dataclasses.replace(PAPER, reorder=False, **k64),
        "rotkv2-paper+center": dataclasses.replace(PAPER, center_keys=True),
        "rotkv2-paper+k64fp8+center": dataclasses.replace(PAPER, center_keys=True, **k64),
        # the shipped default (= paper + k64fp8 + center + first-token sink) and ideas on top of it
        "rotkv2": default2,
        "rotkv2+topk-sinks": dataclasses.replace(default2, sink_mode="topk", max_sink_tokens=4),
        "rotkv2+kclip0.9": dataclasses.replace(default2, key_clip_ratio=0.9),
        "rotkv2+boost-layer0": dataclasses.replace(default2, boosted_layers=(0,)),
        "rotkv2+recent4": dataclasses.replace(default2, recent_window=4),
        "rotkv3": config_for_cache_dtype("rotkv3"),
        "rotkv4": config_for_cache_dtype("rotkv4"),
    }


DEFAULT_METHODS = ["fp", "int4", "int2", "kivi2", "quarot2", *rotkv_variants()]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--json", help="also write the rows as a JSON list of objects")
    ap.add_argument("--workers", type=int, default=1,
                    help="split the methods over this many single-threaded processes (perplexity is deterministic)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if args.workers > 1:
        rows = _run_workers(args, methods)
    else:
        rows = _run(args, methods)
    fp_ppl = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    for r in rows:
        r["ppl_ratio"] = None if fp_ppl is None else round(r["ppl"] / fp_ppl, 4)
    print(f"\nWikiText-2, SmolLM2-135M-Instruct, first {args.tokens} tokens in windows of {args.window}")
    print(f"{'method':36s} {'avg bits':>9s} {'PPL':>10s} {'PPL/fp':>8s}")
    for r in rows:
        ratio = "" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:8.3f}"
        print(f"{r['method']:36s} {r['avg_bits']:9.4f} {r['ppl']:10.3f} {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def _run_workers(args, methods: list[str]) -> list[dict]:
    import os
    import subprocess
    import sys
    import tempfile

    chunks = [methods[i :: args.workers] for i in range(args.workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, chunk in enumerate(c for c in chunks if c):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, "-m", "benchmarks.kv_ppl", "--tokens", str(args.tokens), "--window", str(args.window),
                   "--calib-sequences", str(args.calib_sequences), "--methods", ",".join(chunk), "--json", out]
            procs.append((subprocess.Popen(cmd, env=env), out))
        by_name = {}
        for p, out in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a kv_ppl worker failed with exit code {p.returncode}")
            with open(out) as f:
                by_name.update({r["method"]: r for r in json.load(f)})
    return [by_name[m] for m in methods]


def _run(args, methods: list[str]) -> list[dict]:

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(data_path("wikitext2_test.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ids = ids[: args.tokens]
    calib_text = data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")
    variants = rotkv_variants()
    calibs: dict[tuple, object] = {}

    def calibration_for(cfg: RotateKVConfig):
        # The order depends on the centering (sort by mean or by spread) and the excluded sink tokens.
        key = (cfg.center_keys, cfg.sink_mode, cfg.max_sink_tokens, cfg.sink_topk)
        if key not in calibs:
            calibs[key] = calibrate(model, tok, cfg, text=calib_text, num_sequences=args.calib_sequences, seq_len=512)
        return calibs[key]

    rows = []
    for name in methods:
        if name in variants:
            cfg = variants[name]
            method, cal = KVMethod.from_config(cfg, name), calibration_for(cfg)
        else:
            method, cal = method_from_name(name), None
        st = KVStats()
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, window=args.window, method=method, calibration=cal, stats=st)
        row = {
            "method": name,
            "avg_bits": 16.0 if method.kind == "fp" else round(st.avg_bits, 4),
            "ppl": round(ppl, 4),
            "fp_tokens_per_window": round(st.fp_tokens / max(st.tokens, 1) * args.window, 2),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if method.rotkv is not None:
            row["config"] = method.rotkv.to_dict()
        rows.append(row)
        print(f"{name:36s} bits={row['avg_bits']:7.4f} ppl={ppl:10.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
