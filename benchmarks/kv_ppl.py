"""WikiText-2 perplexity of SmolLM2-135M with quantized K/V: every method measured in one run.

    python -m benchmarks.kv_ppl [--tokens 16384] [--window 1024] [--methods fp,kivi2,rotkv2] [--json out.json]
                                [--workers 3] [--plot ppl_vs_bits.png]
    python -m benchmarks.kv_ppl --rows-from out.json --plot ppl_vs_bits.png     # redraw without measuring

Windows of ``--window`` tokens over the first ``--tokens`` tokens of ``data/wikitext2_test.txt``;
RotateKV is calibrated on ``data/calib_wikitext2_valid.txt`` only (never the evaluation text).
Rows: method, average stored bits per K/V element (scales, zeros and full-precision tokens included,
counted at the end of each window; KIVI's key residual, which fills and empties, at its mean over one
cycle), perplexity, perplexity / fp, and ``*`` for the rows on the accuracy-per-bit frontier (no other row
has both fewer bits and a lower perplexity). ``--plot`` draws perplexity / fp against average bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
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
        # the shipped default (= paper + k64fp8 + center + first-token sink + the last 4 tokens in full
        # precision, as the vLLM backend serves it), the same without its window, and ideas on top of it
        "rotkv2": default2,
        "rotkv2-nowindow": dataclasses.replace(default2, recent_window=0),
        "rotkv2+topk-sinks": dataclasses.replace(default2, sink_mode="topk", max_sink_tokens=4),
        "rotkv2+kclip0.9": dataclasses.replace(default2, key_clip_ratio=0.9),
        "rotkv2+boost-layer0": dataclasses.replace(default2, boosted_layers=(0,)),
        "rotkv3": config_for_cache_dtype("rotkv3"),
        "rotkv4": config_for_cache_dtype("rotkv4"),
        **key_value_presets(default2),
    }


def key_value_presets(base: RotateKVConfig, key_bits=(2, 3, 4), windows=(0, 4, 16, 32)) -> dict[str, RotateKVConfig]:
    """Keys at more bits than 2-bit values (keys are the sensitive half), each with and without a
    full-precision recent window: ``rotkv-k{K}v2[+recent{R}]``. K2V2 without a window is ``rotkv2-nowindow``
    and K2V2 with 4 tokens is ``rotkv2`` itself, so neither is repeated."""
    out = {}
    for kb in key_bits:
        for r in windows:
            name = f"rotkv-k{kb}v2" + (f"+recent{r}" if r else "")
            if (kb, r) not in ((2, 0), (2, 4)):
                out[name] = dataclasses.replace(base, key_bits=kb, recent_window=r)
    return out


def windowed_variant(name: str) -> RotateKVConfig | None:
    """``rotkv{B}+recent{R}`` for any ``B`` in 2, 3, 4 and window ``R`` (e.g. to sweep the window the vLLM
    default keeps), or None for any other name."""
    m = re.fullmatch(r"rotkv([234])\+recent(\d+)", name)
    if m is None:
        return None
    return dataclasses.replace(config_for_cache_dtype(f"rotkv{m.group(1)}"), recent_window=int(m.group(2)))


DEFAULT_METHODS = ["fp", "int4", "int2", "kivi2", "kivi2-r128", "quarot2", *rotkv_variants()]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--json", help="also write the rows as a JSON list of objects")
    ap.add_argument("--workers", type=int, default=1,
                    help="split the methods over this many single-threaded processes (perplexity is deterministic)")
    ap.add_argument("--plot", help="also draw perplexity / fp against average bits into this PNG (needs matplotlib)")
    ap.add_argument("--rows-from", help="read the rows from a previous --json file instead of measuring")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if args.rows_from:
        with open(args.rows_from) as f:
            rows = json.load(f)
    elif args.workers > 1:
        rows = _run_workers(args, methods)
    else:
        rows = _run(args, methods)
    fp_ppl = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    for r in rows:
        r["ppl_ratio"] = None if fp_ppl is None else round(r["ppl"] / fp_ppl, 4)
    on_front = set(frontier(rows))
    for r in rows:
        r["frontier"] = r["method"] in on_front
    title = f"WikiText-2, SmolLM2-135M-Instruct, first {args.tokens} tokens in windows of {args.window}"
    print(f"\n{title}")
    print(f"{'method':36s} {'avg bits':>9s} {'PPL':>10s} {'PPL/fp':>8s}")
    for r in rows:
        ratio = "" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:8.3f}"
        print(f"{r['method']:36s} {r['avg_bits']:9.4f} {r['ppl']:10.3f} {ratio} {'*' if r['frontier'] else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot_rows(rows, args.plot, title)
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
    variants.update({n: windowed_variant(n) for n in methods if n not in variants and windowed_variant(n)})
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
        if args.json:  # after every row, so that an interrupted run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        print(f"{name:36s} bits={row['avg_bits']:7.4f} ppl={ppl:10.3f}", flush=True)
    return rows


def frontier(rows: list[dict]) -> list[str]:
    """Methods no other row dominates: none has at most its bits and at most its perplexity, one of them lower."""
    def dominated(r):
        return any(o["avg_bits"] <= r["avg_bits"] and o["ppl"] <= r["ppl"]
                   and (o["avg_bits"] < r["avg_bits"] or o["ppl"] < r["ppl"]) for o in rows)

    return [r["method"] for r in rows if not dominated(r)]


def _family(name: str) -> str:
    if name == "fp" or name.startswith(("int", "quarot", "kivi")):
        return "baselines"
    if name.startswith("rotkv2-paper"):
        return "RotateKV as published (ablation)"
    if name.startswith("rotkv-k"):
        return "key/value presets (rotkv-kKv2[+recentR])"
    return "rotkv defaults and extensions"


def plot_rows(rows: list[dict], path: str, title: str) -> None:
    """Perplexity / fp (log scale) against average stored bits, one numbered point per quantized row.

    fp is the line at 1 (its 16 bits would squeeze every other point into the left edge). Numbers, not
    names, mark the points (RotateKV's rows crowd around 2.2 bits); the key beside the axes gives each
    number's method, bits and ratio. The accuracy-per-bit frontier is drawn as a step line.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("ppl_ratio") is not None]
    quant = [(i, r) for i, r in enumerate(rows, 1) if r["method"] != "fp"]
    families = list(dict.fromkeys(_family(r["method"]) for _, r in quant))
    colors = dict(zip(families, plt.get_cmap("tab10").colors))
    fig, (ax, key) = plt.subplots(1, 2, figsize=(15, 8), gridspec_kw={"width_ratios": [2.1, 1]})
    for fam in families:
        pts = [r for _, r in quant if _family(r["method"]) == fam]
        ax.scatter([r["avg_bits"] for r in pts], [r["ppl_ratio"] for r in pts], s=36, color=colors[fam],
                   label=fam, zorder=3, edgecolors="black", linewidths=0.4)
    ax.axhline(1.0, color="black", linewidth=1, label="fp (16 bits)")
    front = sorted((r for _, r in quant if r.get("frontier")), key=lambda r: r["avg_bits"])
    if front:
        xmax = max(r["avg_bits"] for _, r in quant) * 1.03
        ax.step([r["avg_bits"] for r in front] + [xmax], [r["ppl_ratio"] for r in front] + [front[-1]["ppl_ratio"]],
                where="post", color="gray", linestyle="--", linewidth=1, zorder=2, label="accuracy-per-bit frontier")
    # Alternate label sides so that neighbours at nearly the same bits do not print on top of each other.
    by_bits = sorted(quant, key=lambda ir: (ir[1]["avg_bits"], ir[1]["ppl_ratio"]))
    for rank, (i, r) in enumerate(by_bits):
        dx = 6 if rank % 2 == 0 else -6
        ax.annotate(str(i), (r["avg_bits"], r["ppl_ratio"]), xytext=(dx, 3), textcoords="offset points",
                    fontsize=8, ha="left" if dx > 0 else "right", color=colors[_family(r["method"])])
    ax.set_yscale("log")
    ax.set_xlabel("average stored bits per K/V element (scales, zeros and full-precision tokens included)")
    ax.set_ylabel("perplexity / fp (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    key.axis("off")
    lines = [f"{i:2d} {r['method'][:34]:34s} {r['avg_bits']:5.2f} {r['ppl_ratio']:7.2f}{' *' if r.get('frontier') else ''}"
             for i, r in enumerate(rows, 1)]
    key.text(0, 1, f"{'':2s} {'method':34s} {'bits':>5s} {'PPL/fp':>7s}\n" + "\n".join(lines),
             family="monospace", fontsize=7.5, va="top", transform=key.transAxes)
    key.text(0, 0, "* on the accuracy-per-bit frontier", fontsize=8, transform=key.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
