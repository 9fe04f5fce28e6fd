"""One decode step of attention on the CPU: rotkv2 fused (C++) vs rotkv2 PyTorch vs vLLM's own bf16 kernel.

    python -m benchmarks.cpu_attention [--quick] [--json PATH] [--reps 5] [--contexts 1024,4096,16384,32768]
                                       [--batches 1,8,32] [--shapes smollm2,llama3-8b]

Attention alone (one layer, no store), side by side in one process; for every (shape, context, batch) point
the three implementations are timed interleaved (``--reps`` rounds, each calling every implementation once,
in rotating order) and the table reports medians of wall-clock time:

- ``bf16``: vLLM 0.32's CPU attention (``vllm._custom_ops.cpu_attention_with_kv_cache``, the op its
  ``CPU_ATTN`` backend calls, ISA picked by vLLM's own ``_get_attn_isa``) on bf16 pages of the same shapes;
- ``rotkv2-torch``: the RotateKV vLLM backend's PyTorch path (``RotateKVAttentionImpl.attend`` with the
  ``"torch"`` metadata its builder makes: dequantize, key decoder matrices, RoPE, SDPA per tile);
- ``rotkv2-fused``: ``rotkv_kernels.rotkv_paged_cpu.paged_attention_cpu`` on the same packed pages.

Shapes (2-bit keys and values, the default RotateKV config: fp8 scales, calibrated-order permutation and key
mean, pre-RoPE keys, one sink token; block size 128 for both caches): SmolLM2-135M (9 query / 3 KV heads
of 64, the 3 KV heads rotated together: width 192 = 12 * 16) and Llama-3-8B (32 / 8 of 128, width 1024).
``bytes`` is the cache one call must read (bf16: K and V; rotkv: the packed records plus the sink tokens),
``GB/s`` that over the time. ``rotkv2-torch`` is skipped where the fp32 K/V it decodes per step would exceed
``--torch-max-gib`` (it materializes them tile by tile and takes seconds there); the table says so.
``--quick`` runs the must-show points (16K and 32K context, batch 8) and a short-context point.

``CPU ms`` is the process CPU time of the call (all threads, OpenMP spinning included; median over the
reps). On a machine shared with other work, wall-clock times move in whole scheduler slices (multiples of
a few ms) whenever a thread waits to be scheduled; the CPU time is the steadier measure of the work
each implementation does, and its ratio is printed beside the wall-clock one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHAPES = {
    # name: (query heads, KV heads, head_dim, RoPE theta)
    "smollm2": (9, 3, 64, 100000.0),
    "llama3-8b": (32, 8, 128, 500000.0),
}
BLOCK_SIZE = 128
TEMPLATE_BLOCKS = 16  # pages written once and copied over the whole cache (the kernels read every byte)


@dataclass
class Point:
    shape: str
    context: int
    batch: int


def _rope(n_pos: int, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([f.cos(), f.cos()], -1).float(), torch.cat([f.sin(), f.sin()], -1).float()


def _runtime(hq: int, h: int, d: int, theta: float, n_pos: int):
    from rotkv_vllm.calibration import RotateKVCalibration
    from rotkv_vllm.config import RotateKVConfig, RotateKVLayout
    from rotkv_vllm.runtime import RotateKVRuntime

    cfg = RotateKVConfig.for_bits(2)
    gen = torch.Generator().manual_seed(0)
    info = dict(model_type="llama", num_hidden_layers=1, num_attention_heads=hq, num_key_value_heads=h, head_dim=d,
                hidden_size=hq * d)
    g = RotateKVLayout.resolve(cfg, h, d, 1).head_group_size  # the calibration's default grouping
    order = torch.cat([torch.randperm(g * d, generator=gen) + j * g * d for j in range(h // g)])
    calib = RotateKVCalibration(config=cfg, model_info=info, head_group_size=g, key_orders=[order.to(torch.int64)],
                                key_means=[torch.randn(h * d, generator=gen) * 0.1])
    return RotateKVRuntime.from_calibration(calib, "rotkv2", dtype=torch.bfloat16, rope=_rope(n_pos, d, theta))


class RotKVSetup:
    """One layer's packed cache holding ``batch`` sequences of ``context`` tokens, and both rotkv paths."""

    def __init__(self, rt, point: Point, hq: int, query: torch.Tensor, table: torch.Tensor, num_blocks: int):
        from vllm.v1.attention.backend import CommonAttentionMetadata
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from rotkv_kernels.rotkv_cache import rotate_half
        from rotkv_kernels.rotkv_paged import alloc_paged_cache
        from rotkv_kernels.rotkv_paged_cpu import paged_write_cpu
        from rotkv_vllm import vllm_backend as vb

        self.rt, self.point, self.query = rt, point, query
        p = rt.kernel_params(0, "cpu")
        self.params = p
        sp = p.spec
        h, d = sp.num_kv_heads, sp.head_dim
        # a few pages written through the real write path, then copied over the cache
        n0 = TEMPLATE_BLOCKS * BLOCK_SIZE
        tmpl = alloc_paged_cache(sp, TEMPLATE_BLOCKS, BLOCK_SIZE, torch.bfloat16, fill=0)
        gen = torch.Generator().manual_seed(1)
        pos = torch.arange(n0)
        k_pre = torch.randn(n0, h, d, generator=gen)
        k = (k_pre * rt.rope_cos[pos][:, None] + rotate_half(k_pre) * rt.rope_sin[pos][:, None]).to(torch.bfloat16)
        v = torch.randn(n0, h, d, generator=gen).to(torch.bfloat16)
        paged_write_cpu(k, v, pos, tmpl.records, spec=sp, positions=pos, sinks=tmpl.sinks, rope_cos=p.rope_cos,
                        rope_sin=p.rope_sin, key_perm=p.key_perm, key_mean=p.key_mean)
        self.cache = alloc_paged_cache(sp, num_blocks, BLOCK_SIZE, torch.bfloat16)
        page = tmpl.raw.numel() // TEMPLATE_BLOCKS
        full = num_blocks // TEMPLATE_BLOCKS * TEMPLATE_BLOCKS
        self.cache.raw[: full * page].view(-1, tmpl.raw.numel()).copy_(tmpl.raw)
        self.cache.raw[full * page:].copy_(tmpl.raw[: (num_blocks - full) * page])
        self.table = table
        b = point.batch
        self.seq_lens = torch.full((b,), point.context, dtype=torch.int32)
        self.qsl = torch.arange(b + 1, dtype=torch.int32)
        self.out_fused = torch.empty(b, hq, d, dtype=torch.bfloat16)
        self.out_torch = torch.empty(b, hq, d, dtype=torch.bfloat16)
        self.bytes = b * point.context * (sp.key_bytes + sp.value_bytes) + b * sp.sink_tokens * sp.sink_token_bytes(
            torch.bfloat16)
        # the backend's PyTorch path, as vLLM would drive it (metadata built once per step, outside the timing)
        vb.install_runtime(rt)
        spec = vb.RotateKVAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=h, head_size=d, dtype=torch.uint8))
        # the PyTorch path's metadata (tiles): the builder picks the C++ kernels on the CPU when they are built
        saved = os.environ.get(vb.ATTENTION_IMPL_ENV)
        os.environ[vb.ATTENTION_IMPL_ENV] = "torch"
        try:
            builder = vb.RotateKVAttentionMetadataBuilder(spec, ["l"], None, torch.device("cpu"), runtime=rt)
        finally:
            if saved is None:
                os.environ.pop(vb.ATTENTION_IMPL_ENV)
            else:
                os.environ[vb.ATTENTION_IMPL_ENV] = saved
        self.impl = vb.RotateKVAttentionImpl(hq, d, d ** -0.5, h, None, None, "rotkv2", runtime=rt)
        self.impl._layer = 0
        slots = (table[:, (point.context - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (point.context - 1) % BLOCK_SIZE)
        cm = CommonAttentionMetadata(
            query_start_loc=self.qsl, query_start_loc_cpu=self.qsl, seq_lens=self.seq_lens, num_reqs=b,
            num_actual_tokens=b, max_query_len=1, max_seq_len=point.context, block_table_tensor=table,
            slot_mapping=slots)
        self.md = builder.build(0, cm)
        if self.md.attention_impl != "torch":
            raise RuntimeError(f"the builder picked {self.md.attention_impl!r} with {vb.ATTENTION_IMPL_ENV}=torch")
        # the presets' recent window: the step's own K/V and the R - 1 positions before it, in full precision
        self.window = (torch.randn(b, h, d, generator=gen).to(torch.bfloat16),
                       torch.randn(b, h, d, generator=gen).to(torch.bfloat16),
                       torch.randn(b, max(sp.recent_window - 1, 0), 2, h, d, generator=gen).to(torch.bfloat16)
                       if sp.recent_window > 1 else None)

    def fused(self) -> None:
        from rotkv_kernels.rotkv_paged_cpu import paged_attention_cpu

        p = self.params
        paged_attention_cpu(self.query, self.cache.records, self.table, self.seq_lens, self.qsl, spec=p.spec,
                            scale=p.spec.head_dim ** -0.5, sinks=self.cache.sinks, rope_cos=p.rope_cos,
                            rope_sin=p.rope_sin, key_perm=p.key_perm, key_mean=p.key_mean, out=self.out_fused,
                            **(dict(zip(("recent_key", "recent_value", "recent_prev"), self.window))
                               if p.spec.recent_window else {}))

    def torch_path(self) -> None:
        self.impl.attend(0, self.query, self.cache.kv_cache, self.md, self.out_torch,
                         self.window if self.params.spec.recent_window else None)


class BF16Setup:
    """vLLM's CPU attention on bf16 pages ``[num_blocks, H, 2 * block_size, D]`` (its cache layout)."""

    def __init__(self, point: Point, hq: int, h: int, d: int, query: torch.Tensor, table: torch.Tensor,
                 num_blocks: int):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops = ops
        gen = torch.Generator().manual_seed(2)
        tmpl = torch.randn(TEMPLATE_BLOCKS, h, 2 * BLOCK_SIZE, d, generator=gen).to(torch.bfloat16)
        kv = torch.empty(num_blocks, h, 2 * BLOCK_SIZE, d, dtype=torch.bfloat16)
        full = num_blocks // TEMPLATE_BLOCKS * TEMPLATE_BLOCKS
        kv[:full].view(-1, *tmpl.shape).copy_(tmpl)
        kv[full:].copy_(tmpl[: num_blocks - full])
        self.key_cache, self.value_cache = kv.chunk(2, dim=2)
        self.kv = kv
        b = point.batch
        self.query, self.table = query, table
        self.seq_lens = torch.full((b,), point.context, dtype=torch.int32)
        self.qsl = torch.arange(b + 1, dtype=torch.int32)
        self.out = torch.empty(b, hq, d, dtype=torch.bfloat16)
        self.scale = d ** -0.5
        self.isa = _get_attn_isa(torch.bfloat16, BLOCK_SIZE, d, "auto")
        self.md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=b, num_heads=hq, num_kv_heads=h, head_dim=d, seq_lens=self.seq_lens, dtype=torch.bfloat16,
            query_start_loc=self.qsl, causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=True)
        self.bytes = b * point.context * h * d * 2 * 2

    def run(self) -> None:
        self.ops.cpu_attention_with_kv_cache(
            query=self.query, key_cache=self.key_cache, value_cache=self.value_cache, output=self.out,
            query_start_loc=self.qsl, seq_lens=self.seq_lens, scale=self.scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=self.table, softcap=0.0, scheduler_metadata=self.md, s_aux=None)


def run_point(point: Point, reps: int, torch_max_bytes: float) -> list[dict]:
    hq, h, d, theta = SHAPES[point.shape]
    b, ctx = point.batch, point.context
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = b * blocks_per_seq
    gen = torch.Generator().manual_seed(3)
    table = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(b, blocks_per_seq)
    query = torch.randn(b, hq, d, generator=gen).to(torch.bfloat16)
    rt = _runtime(hq, h, d, theta, max(ctx, TEMPLATE_BLOCKS * BLOCK_SIZE) + 1)
    rk = RotKVSetup(rt, point, hq, query, table, num_blocks)
    bf = BF16Setup(point, hq, h, d, query, table, num_blocks)
    torch_bytes = b * ctx * h * d * 4 * 2  # fp32 K and V the PyTorch path decodes per step
    impls = {"bf16": bf.run, "rotkv2-fused": rk.fused}
    skipped = None
    if torch_bytes <= torch_max_bytes:
        impls["rotkv2-torch"] = rk.torch_path
    else:
        skipped = f"skipped: decodes {torch_bytes / 2**30:.1f} GiB of fp32 K/V per step (> --torch-max-gib)"
    times: dict[str, list[float]] = {k: [] for k in impls}
    cpu_times: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for fn in impls.values():  # warm-up: first-touch of outputs, lazily built tables
        fn()
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    nbytes = {"bf16": bf.bytes, "rotkv2-fused": rk.bytes, "rotkv2-torch": rk.bytes}
    rows = []
    for name in ("bf16", "rotkv2-torch", "rotkv2-fused"):
        row = dict(impl=name, shape=point.shape, context=ctx, batch=b, bytes_read=nbytes[name],
                   threads=torch.get_num_threads(), reps=reps)
        if name in med:
            row.update(seconds=med[name], time_ratio_to_bf16=med[name] / med["bf16"],
                       bytes_per_s=nbytes[name] / med[name], cpu_seconds=cpu_med[name],
                       cpu_ratio_to_bf16=cpu_med[name] / cpu_med["bf16"])
        else:
            row.update(seconds=None, time_ratio_to_bf16=None, bytes_per_s=None, cpu_seconds=None,
                       cpu_ratio_to_bf16=None, note=skipped)
        rows.append(row)
    if "rotkv2-torch" in med:  # both rotkv paths read the same pages: their outputs must agree
        diff = (rk.out_fused.float() - rk.out_torch.float()).abs().max().item()
        for row in rows:
            if row["impl"] == "rotkv2-fused":
                row["max_abs_diff_vs_torch"] = diff
    del rk, bf
    return rows


def _fmt(rows: list[dict]) -> str:
    head = ("| shape | context | batch | impl | ms | x bf16 | CPU ms | CPU x bf16 | cache read (MiB) | GB/s | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["seconds"] is None:
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['impl']} | - | - | - | - | "
                         f"{r['bytes_read'] / 2**20:.1f} | - | {r.get('note', '')} |")
            continue
        note = f"max |fused - torch| {r['max_abs_diff_vs_torch']:.2g}" if "max_abs_diff_vs_torch" in r else ""
        lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r['time_ratio_to_bf16']:.2f} | {r['cpu_seconds'] * 1e3:.2f} | {r['cpu_ratio_to_bf16']:.2f} | "
                     f"{r['bytes_read'] / 2**20:.1f} | "
                     f"{r['bytes_per_s'] / 1e9:.2f} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16K and 32K at batch 8, and 1K at batch 1")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--torch-max-gib", type=float, default=4.0)
    args = ap.parse_args(argv)
    from rotkv_kernels.rotkv_paged_cpu import cpu_isa, cpu_kernels_status

    why = cpu_kernels_status()
    if why is not None:
        raise SystemExit(why)
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r}; expected some of {sorted(SHAPES)}")
    if args.quick:
        grid = [(1024, 1), (16384, 8), (32768, 8)]
    else:
        grid = [(c, b) for c in map(int, args.contexts.split(",")) for b in map(int, args.batches.split(","))]
    print(f"threads {torch.get_num_threads()}, fused kernel ISA {cpu_isa()}, reps {args.reps} (medians, interleaved)",
          flush=True)
    rows: list[dict] = []
    for shape in shapes:
        for ctx, b in grid:
            pt = run_point(Point(shape, ctx, b), args.reps, args.torch_max_gib * 2**30)
            rows += pt
            print(_fmt(pt).split("\n", 2)[2], flush=True)
    print()
    print(_fmt(rows))
    must = [r for r in rows if r["impl"] == "rotkv2-fused" and r["batch"] == 8 and r["context"] in (16384, 32768)]
    if must:
        ok = all(r["time_ratio_to_bf16"] <= 1.0 for r in must)
        print("\nmust-show (16K and 32K context, batch 8, fused <= 1.0x bf16): "
              + ", ".join(f"{r['shape']} {r['context']}: {r['time_ratio_to_bf16']:.2f}x" for r in must)
              + (" -> met" if ok else " -> NOT met")
              + "; CPU time: " + ", ".join(f"{r['shape']} {r['context']}: {r['cpu_ratio_to_bf16']:.2f}x" for r in must))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
