"""RotateKV cache records: memory, reconstruction accuracy on real K/V, and reference speed, side by side.

    nice .venv/bin/python -m benchmarks.bench_rotkv_cache [--tokens 512] [--json PATH]

Shapes come from the bundled SmolLM2-135M-Instruct (3 KV heads x 64, 30 layers). Its pre-RoPE keys
(``k_proj`` outputs) and values (``v_proj`` outputs) are captured on calibration text
(``data/calib_wikitext2_valid.txt``): the first half of the tokens calibrates the channel
order, the second half is measured. Rows, all from this one run:

- ``memory``: bytes per token of one layer's K (or V) record vs fp16 (``2 * H * D`` bytes).
- ``accuracy``: relative L2 error ``||x^ - x|| / ||x||`` over all layers for three encodings at the same
  bits/group/scale format: plain group quantization of the raw channels (no rotation), the RotateKV record
  with rotation only, and rotation + calibrated channel order (keys; values are rotated per head and not
  reordered). The ratio columns divide by the plain quantizer's error. Group 192 (SmolLM2's default, one
  group per token) and group 64.
- ``speed``: CPU time per token of the PyTorch reference write/read (``rotkv_write_ref``/``rotkv_read_ref``,
  a 512-token batch) vs ``torch.clone`` of the same fp16 K as the memory-bound floor. No GPU here, so the
  Triton kernels are not timed (the interpreter's speed means nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from rotkv_data import CALIB_TEXT, data_path
from rotkv_kernels.hadamard import hadamard_transform
from rotkv_kernels.quant import default_clip_ratio, fake_quantize_groupwise
from rotkv_kernels.rotkv_cache import record_bytes, rotkv_read_ref, rotkv_write_ref

logger = logging.getLogger(__name__)
CALIB = data_path(CALIB_TEXT)


def capture_kv(n_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
    """Pre-RoPE K and V of every layer for ``n_tokens`` calibration tokens: lists of ``[T, H, D]`` fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotkv_vllm.bundled_model import ensure_smollm2

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    h, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = tok(CALIB.read_text()[: 20 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    keys, values, hooks = [], [], []
    def keep(store):
        return lambda mod, inp, out: store.append(out[0].reshape(-1, h, d))

    for layer in model.model.layers:
        hooks.append(layer.self_attn.k_proj.register_forward_hook(keep(keys)))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(keep(values)))
    with torch.no_grad():
        model(ids)
    for hk in hooks:
        hk.remove()
    return keys, values, h, d


def calibrate_perm(k: torch.Tensor, rot_width: int) -> torch.Tensor:
    """RotateKV's channel order: the signed sum of each rotated channel, sorted ascending within each block."""
    t, h, d = k.shape
    y = hadamard_transform(k.reshape(t, h * d), block_size=rot_width).sum(0)
    blocks = y.reshape(-1, rot_width).argsort(dim=-1) + torch.arange(0, h * d, rot_width)[:, None]
    return blocks.reshape(-1)


def rel_err(xh: torch.Tensor, x: torch.Tensor) -> float:
    return ((xh.double() - x.double()).pow(2).sum() / x.double().pow(2).sum()).sqrt().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list of objects")
    args = ap.parse_args()
    torch.manual_seed(0)
    keys, values, h, d = capture_kv(args.tokens)
    width = h * d
    half = keys[0].shape[0] // 2
    rows = []

    for bits in (2, 3, 4):
        for fmt in ("fp16", "fp8"):
            for gs in (width, 64):
                rb = record_bytes(width, bits, gs, fmt)
                rows.append(dict(kind="memory", bits=bits, scale_format=fmt, group_size=gs, bytes_per_token=rb,
                                 fp16_bytes=2 * width, ratio_vs_fp16=round(2 * width / rb, 3)))

    # group 192 is the SmolLM2 default (one group per token: reordering cannot change a group's min/max);
    # group 64 shows what the calibrated order does when a rotated block holds several groups.
    for bits in (2, 3, 4):
        for gs, fmt in ((width, "fp16"), (width, "fp8"), (64, "fp16")):
            clip = default_clip_ratio(bits)
            for name, data, rw in (("key", keys, width), ("value", values, d)):
                plain, rot, rot_perm = [], [], []
                for x in data:
                    perm = calibrate_perm(x[:half], rw) if name == "key" else None
                    xe = x[half:]
                    t = xe.shape[0]
                    plain.append(fake_quantize_groupwise(xe.reshape(t, width), bits, gs, clip, fmt).reshape(xe.shape))
                    kw = dict(bits=bits, group_size=gs, rot_width=rw, clip_ratio=clip, scale_format=fmt)
                    rk = dict(num_heads=h, head_dim=d, bits=bits, group_size=gs, rot_width=rw, scale_format=fmt)
                    rot.append(rotkv_read_ref(rotkv_write_ref(xe, **kw), **rk))
                    if perm is not None:
                        rot_perm.append(rotkv_read_ref(rotkv_write_ref(xe, perm=perm, **kw), perm=perm, **rk))
                xs = torch.cat([x[half:] for x in data])
                e_plain = rel_err(torch.cat(plain), xs)
                e_rot = rel_err(torch.cat(rot), xs)
                row = dict(kind="accuracy", tensor=name, bits=bits, scale_format=fmt, group_size=gs, clip=clip,
                           rel_err_plain=round(e_plain, 4), rel_err_rotated=round(e_rot, 4),
                           ratio_rotated_vs_plain=round(e_rot / e_plain, 3))
                if rot_perm:
                    e_rp = rel_err(torch.cat(rot_perm), xs)
                    row.update(rel_err_rotated_reordered=round(e_rp, 4),
                               ratio_reordered_vs_plain=round(e_rp / e_plain, 3))
                rows.append(row)

    k = torch.cat(keys)[:512].contiguous()
    kh = k.half()
    reps = 20

    def timeit(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps / k.shape[0] * 1e6

    t_clone = timeit(lambda: kh.clone())
    kw = dict(bits=2, group_size=width, rot_width=width, clip_ratio=0.8)
    rec = rotkv_write_ref(k, **kw)
    t_w = timeit(lambda: rotkv_write_ref(k, **kw))
    rk = dict(num_heads=h, head_dim=d, bits=2, group_size=width, rot_width=width)
    t_r = timeit(lambda: rotkv_read_ref(rec, **rk))
    for op, us in (("write_ref", t_w), ("read_ref", t_r)):
        rows.append(dict(kind="speed", op=op, tokens=k.shape[0], us_per_token=round(us, 3),
                         clone_us_per_token=round(t_clone, 4), ratio_vs_clone=round(us / t_clone, 1)))

    for kind in ("memory", "accuracy", "speed"):
        sel = [r for r in rows if r["kind"] == kind]
        cols = [c for c in sel[0] if c != "kind"]
        for r in sel:
            cols += [c for c in r if c not in cols and c != "kind"]
        print(f"\n[{kind}]")
        print(" | ".join(cols))
        for r in sel:
            print(" | ".join(str(r.get(c, "")) for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
