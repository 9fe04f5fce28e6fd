"""WikiText-2 perplexity of SmolLM2-135M with quantized K/V: every method measured in one run.

    python -m benchmarks.kv_ppl [--tokens 16384] [--window 1024] [--methods fp,kivi2,rotkv2] [--json out.json]

Windows of ``--window`` tokens over the first ``--tokens`` tokens of ``shared/data/wikitext2_test.txt``;
RotateKV is calibrated on ``shared/data/calib_wikitext2_valid.txt`` only (never the evaluation text).
Rows: method, average stored bits per K/V element (scales, zeros and full-precision tokens included,
counted at the end of each window), perplexity, and perplexity / fp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from rotkv_vllm.bundled_model import ensure_smollm2, shared_data_path
from rotkv_vllm.calibration import calibrate
from rotkv_vllm.config import RotateKVConfig, config_for_cache_dtype
from rotkv_vllm.reference import KVMethod, KVStats, method_from_name, perplexity

# The paper's recipe on this model: group = the whole 192-wide rotated group (fp16 scale and zero),
# clip 0.8, top-20 activation sinks, calibrated channel order, pre-RoPE grouped-head rotation.
PAPER = RotateKVConfig(key_bits=2, value_bits=2)


def rotkv_variants() -> dict[str, RotateKVConfig]:
    """Named RotateKV configs: the paper's ablation, then each idea past the paper as its own row."""
    d = config_for_cache_dtype("rotkv2")
    return {
        # the paper's ablation (cumulative, on this model's layout)
        "rotkv2-paper-postrope": dataclasses.replace(PAPER, pre_rope=False, reorder=False, sink_mode="none"),
        "rotkv2-paper-prerope": dataclasses.replace(PAPER, reorder=False, sink_mode="none"),
        "rotkv2-paper-sinks": dataclasses.replace(PAPER, reorder=False),
        "rotkv2-paper": PAPER,
        # past the paper, one idea per row (same 2-bit budget)
        "rotkv2-g64fp8": dataclasses.replace(PAPER, group_size=64, scale_format="fp8"),
        "rotkv2-g64fp8-noreorder": dataclasses.replace(PAPER, group_size=64, scale_format="fp8", reorder=False),
        "rotkv2-k64v192fp8": dataclasses.replace(PAPER, group_size=64, value_group_size=192, scale_format="fp8"),
        "rotkv2-center": dataclasses.replace(PAPER, center_keys=True),
        "rotkv2-k64v192fp8-center": dataclasses.replace(PAPER, group_size=64, value_group_size=192,
                                                         scale_format="fp8", center_keys=True),
        "rotkv2-firstsink": dataclasses.replace(PAPER, sink_mode="first", max_sink_tokens=1),
        "rotkv2-recent16": dataclasses.replace(PAPER, recent_window=16),
        "rotkv2-boost0": dataclasses.replace(PAPER, boosted_layers=(0,), boost_bits=4),
        # the shipped defaults
        "rotkv2": d,
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
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(shared_data_path("wikitext2_test.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ids = ids[: args.tokens]
    calib_text = shared_data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")
    variants = rotkv_variants()
    calibs: dict[tuple, object] = {}

    def calibration_for(cfg: RotateKVConfig):
        # The order depends on the centering (sort by mean or by spread) and the excluded sink tokens.
        key = (cfg.center_keys, cfg.sink_mode, cfg.max_sink_tokens, cfg.sink_topk)
        if key not in calibs:
            calibs[key] = calibrate(model, tok, cfg, text=calib_text, num_sequences=args.calib_sequences, seq_len=512)
        return calibs[key]

    rows = []
    fp_ppl = None
    for name in args.methods.split(","):
        if name in variants:
            cfg = variants[name]
            method, cal = KVMethod.from_config(cfg, name), calibration_for(cfg)
        else:
            method, cal = method_from_name(name), None
        st = KVStats()
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, window=args.window, method=method, calibration=cal, stats=st, progress=True)
        if name == "fp":
            fp_ppl = ppl
        row = {
            "method": name,
            "avg_bits": 16.0 if method.kind == "fp" else round(st.avg_bits, 4),
            "ppl": round(ppl, 4),
            "ppl_ratio": None if fp_ppl is None else round(ppl / fp_ppl, 4),
            "fp_tokens_per_window": round(st.fp_tokens / max(st.tokens, 1) * args.window, 2),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if method.rotkv is not None:
            row["config"] = method.rotkv.to_dict()
        rows.append(row)
        print(f"{name:28s} bits={row['avg_bits']:7.4f} ppl={ppl:10.3f} ratio={row['ppl_ratio']}", flush=True)

    print(f"\nWikiText-2, SmolLM2-135M-Instruct, {ids.numel()} tokens in windows of {args.window}")
    print(f"{'method':28s} {'avg bits':>9s} {'PPL':>10s} {'PPL/fp':>8s}")
    for r in rows:
        ratio = "" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:8.3f}"
        print(f"{r['method']:28s} {r['avg_bits']:9.4f} {r['ppl']:10.3f} {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
