"""The full-precision recent window of the paged cache, step by step as vLLM drives it.

A sequence is written and read over several steps (chunked prefill chunks, decode steps, requests starting at
block boundaries and mid-block), with the window read from the step's own K/V and from the pages' rings
(``recent_prev_ref`` around the write). Checked:

- the reference (``paged_attention_ref``) equals an oracle that never looks at the rings: dense attention in
  which key ``j`` of query ``t`` is the token's original K/V when ``t - R < j <= t`` and its decoded record
  otherwise. Both compute in float64 over the same decoded records, so they agree to fp64 rounding; any ring slot
  read for the wrong position (or stale) would move the output by O(|v|);
- every token is stored packed: the records are the bytes a window-less cache holds (a token that leaves the
  window reads exactly its record);
- the CPU tiles path, the Triton kernels (interpreted on the CPU) and the C++ kernel against the reference.
"""

from __future__ import annotations


import pytest
import torch

from paged_cases import apply_rope, quarter_turn_tables
from rotkv_kernels.rotkv_paged import (
    PagedCacheSpec,
    _decode_context,
    alloc_paged_cache,
    paged_attention_ref,
    paged_write_ref,
    recent_prev_ref,
    recent_window_kv,
    ring_write_mask,
)
from rotkv_kernels.rotkv_paged_tiles import CpuReadTables, attend_tiles, build_tile, interleave_order, plan_tiles

H, D, HQ = 2, 32, 4
BS = 16


def _spec(window: int, sinks: int = 1, bits: int = 2) -> PagedCacheSpec:
    return PagedCacheSpec(num_kv_heads=H, head_dim=D, key_bits=bits, value_bits=2, key_group_size=32,
                          value_group_size=64, key_rot_width=2 * D, scale_format="fp16", sink_tokens=sinks,
                          recent_window=window)


# Each request: its chunk length per step (0: not scheduled). Chunks start mid-block (7, 20, ...) and at block
# boundaries (16, 32); request 2 starts later; the last steps are decode steps.
SCHEDULE = [
    [7, 16, 0],
    [13, 9, 16],
    [2, 7, 3],
    [1, 1, 13],
    [1, 1, 1],
    [12, 1, 1],
]


class Steps:
    """The scheduled requests' history: original K (post-RoPE) and V per position, block tables, and the
    tensors of each step in vLLM's conventions (tokens of a request consecutive, padding rows with slot -1)."""

    def __init__(self, spec: PagedCacheSpec, seed: int = 0, num_blocks: int = 40,
                 schedule: list[list[int]] = SCHEDULE):
        gen = torch.Generator().manual_seed(seed)
        self.spec, self.gen = spec, gen
        total = [sum(c[r] for c in schedule) for r in range(len(schedule[0]))]
        self.cos, self.sin = quarter_turn_tables(max(total) + 1, D, gen)
        free = torch.randperm(num_blocks, generator=gen).tolist()
        width = max(-(-n // BS) for n in total)
        self.tables = torch.tensor([[free.pop() for _ in range(width)] for _ in total], dtype=torch.int32)
        k_pre = [torch.randn(n, H, D, generator=gen) for n in total]
        self.keys = [apply_rope(k, self.cos[:n], self.sin[:n]) for k, n in zip(k_pre, total)]
        self.values = [torch.randn(n, H, D, generator=gen) for n in total]
        rw = spec.key_rot_width
        self.perm = torch.cat([torch.randperm(rw, generator=gen) + b * rw for b in range(spec.width // rw)])
        self.mean = torch.randn(spec.width, generator=gen) * 0.3
        self.done = [0] * len(total)

    def step(self, chunks: list[int]) -> dict:
        key, value, slots, pos, qsl, seq = [], [], [], [], [0], []
        for r, n in enumerate(chunks):
            p = torch.arange(self.done[r], self.done[r] + n)
            key.append(self.keys[r][p])
            value.append(self.values[r][p])
            slots.append(self.tables[r, p // BS].long() * BS + p % BS)
            pos.append(p)
            self.done[r] += n
            qsl.append(qsl[-1] + n)
            seq.append(self.done[r])
        pad = 2  # vLLM pads the token count: slot -1, position 0
        t = qsl[-1]
        return dict(
            key=torch.cat(key + [torch.zeros(pad, H, D)]), value=torch.cat(value + [torch.ones(pad, H, D)]),
            slots=torch.cat(slots + [torch.full((pad,), -1)]),
            positions=torch.cat(pos + [torch.zeros(pad, dtype=torch.long)]),
            qsl=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq, dtype=torch.int32),
            query=torch.randn(t + pad, HQ, D, generator=self.gen), num_tokens=t,
        )


def _write(spec, cache, steps: Steps, st: dict, write=paged_write_ref, read=recent_prev_ref):
    """``read`` (``recent_prev_ref`` or a kernel's twin) before and after the step's write, as the vLLM backend
    calls them."""
    before = None
    if spec.ring_slots:
        before = read(cache.sinks, steps.tables, st["seq_lens"], st["qsl"], spec=spec, block_size=BS)
    write(st["key"], st["value"], st["slots"], cache.records, spec=spec, positions=st["positions"], sinks=cache.sinks,
          rope_cos=steps.cos, rope_sin=steps.sin, key_perm=steps.perm, key_mean=steps.mean)
    if spec.ring_slots:
        return read(cache.sinks, steps.tables, st["seq_lens"], st["qsl"], spec=spec, block_size=BS, before=before)
    return None


def _ref(spec, cache, steps, st, prev):
    return paged_attention_ref(st["query"], cache.records, steps.tables, st["seq_lens"], st["qsl"], spec=spec,
                               scale=D ** -0.5, sinks=cache.sinks, rope_cos=steps.cos, rope_sin=steps.sin,
                               key_perm=steps.perm, key_mean=steps.mean, out_dtype=torch.float32,
                               recent_key=st["key"], recent_value=st["value"], recent_prev=prev)


def _oracle(spec, cache, steps, st, tables=None) -> torch.Tensor:
    """Dense attention with the window taken from the original K/V (never from the rings), over each query's
    sliding window when the spec has one (masked here); records read through ``tables`` (default the steps')."""
    out = torch.zeros(st["query"].shape, dtype=torch.float64)
    qsl = st["qsl"].tolist()
    rep = HQ // H
    tables = steps.tables if tables is None else tables
    for r, length in enumerate(st["seq_lens"].tolist()):
        lo, hi = qsl[r], qsl[r + 1]
        if hi == lo:
            continue
        k, v = _decode_context(spec, cache.records, cache.sinks, tables[r], length, steps.cos, steps.sin,
                               steps.perm, steps.mean)
        k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
        kt = steps.keys[r][:length].double().repeat_interleave(rep, 1)
        vt = steps.values[r][:length].double().repeat_interleave(rep, 1)
        for i in range(lo, hi):
            t = length - (hi - lo) + (i - lo)
            j = torch.arange(max(0, t - spec.sliding_window + 1) if spec.sliding_window else 0, t + 1)
            fp = (j > t - spec.recent_window)[:, None, None]
            kk, vv = torch.where(fp, kt[j], k[j]), torch.where(fp, vt[j], v[j])
            p = (torch.einsum("hd,jhd->hj", st["query"][i].double(), kk) * D ** -0.5).softmax(-1)
            out[i] = torch.einsum("hj,jhd->hd", p, vv)
    return out


@pytest.mark.parametrize("window", [1, 2, 4, 9])
def test_reference_window_equals_dense_oracle_over_steps(window):
    spec = _spec(window)
    steps = Steps(spec, seed=window)
    cache = alloc_paged_cache(spec, 40, BS, torch.float32, fill=0xFF)
    plain = alloc_paged_cache(_spec(0), 40, BS, torch.float32, fill=0xFF)
    for chunks in SCHEDULE:
        st = steps.step(chunks)
        prev = _write(spec, cache, steps, st)
        _write(_spec(0), plain, steps, st)
        got = _ref(spec, cache, steps, st, prev)
        want = _oracle(spec, cache, steps, st)
        n = st["num_tokens"]
        # Same decoded records and the same original K/V on both sides in fp64; the reference rounds its output
        # to fp32 once (|out| < 8: half an ulp is below 4.8e-7).
        torch.testing.assert_close(got[:n].double(), want[:n], rtol=0, atol=5e-7)
    # Every token is stored packed as well: the records hold the bytes of a cache without a window.
    nb = spec.key_bytes + spec.value_bytes
    assert torch.equal(cache.records[..., :nb], plain.records[..., :nb])


def test_ring_write_mask_keeps_the_last_writer_of_each_slot():
    # Request A: positions 3..12 of its block at slots 3..12 (block 0); B: positions 0..1 at block 2.
    slots = torch.tensor(list(range(3, 13)) + [32, 33, -1])
    m = ring_write_mask(slots, block_size=16, ring_slots=3)
    # In A, offset o is overwritten by o + 3 when o + 3 <= 12: only the last 3 (10, 11, 12) write.
    assert m.tolist() == [False] * 7 + [True] * 3 + [True, True, False]


def _prev_reader(impl: str):
    if impl == "ref":
        return recent_prev_ref
    from rotkv_kernels.rotkv_paged_cpu import cpu_kernels_status, recent_prev_cpu

    if cpu_kernels_status() is not None:
        pytest.fail(f"the C++ CPU kernels are not built: {cpu_kernels_status()}")
    return recent_prev_cpu


@pytest.mark.parametrize("impl", ["ref", "cpp"])
def test_prev_gather_reads_own_block_before_and_older_blocks_after_the_write(impl):
    recent_prev = _prev_reader(impl)
    spec = _spec(4, sinks=0)
    cache = alloc_paged_cache(spec, 4, BS, torch.float32, fill=0)
    tables = torch.tensor([[2, 3]], dtype=torch.int32)
    # step start p0 = 17 (block 1, offset 1): prev positions 14, 15 (block 0) and 16 (block 1).
    seq, qsl = torch.tensor([20], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    cache.sinks[2, :, 0] = torch.arange(3.0).view(3, 1, 1)  # ring of block 0 (= physical 2): slot o % 3
    cache.sinks[3, :, 0] = 10 + torch.arange(3.0).view(3, 1, 1)
    before = recent_prev(cache.sinks, tables, seq, qsl, spec=spec, block_size=BS)
    cache.sinks.zero_()
    cache.sinks[2, :, 0] = 100.0
    cache.sinks[3, :, 0] = 200.0
    got = recent_prev(cache.sinks, tables, seq, qsl, spec=spec, block_size=BS, before=before)[0, :, 0, 0, 0]
    assert got.tolist() == [100.0, 100.0, 10.0 + (16 % BS) % 3]


@pytest.mark.parametrize("window", [1, 4])
def test_tiles_path_matches_reference_with_window(window):
    spec = _spec(window)
    steps = Steps(spec, seed=10 + window)
    cache = alloc_paged_cache(spec, 40, BS, torch.float32, fill=0xFF)
    tables = CpuReadTables.build(spec, key_perm=steps.perm, key_mean=steps.mean,
                                 channel_order=interleave_order(H, D),
                                 rope=CpuReadTables.rope_table(steps.cos, steps.sin))
    for chunks in SCHEDULE:
        st = steps.step(chunks)
        prev = _write(spec, cache, steps, st)
        ref = _ref(spec, cache, steps, st, prev)
        qsl, seq = st["qsl"].long(), st["seq_lens"].long()
        q_lens = qsl[1:] - qsl[:-1]
        tiles = [build_tile(torch.tensor(r), lo, hi, qsl, q_lens, seq, steps.tables.long(), BS)
                 for r, lo, hi in plan_tiles(q_lens.tolist(), seq.tolist(), context_budget=40, score_budget=400)]
        n = st["num_tokens"]
        recent = recent_window_kv(st["key"], st["value"], prev, qsl, seq, n, window)
        out = torch.full((n + 2, HQ, D), 7.0)
        attend_tiles(st["query"], cache.records, cache.sinks, tiles, tables, scale=D ** -0.5, output=out,
                     recent=recent)
        # fp32 against fp64 over at most ~60 keys of |v| < 5: a few fp32 roundings of values below 5 each.
        torch.testing.assert_close(out[:n], ref[:n], rtol=0, atol=2e-5)
        assert torch.equal(out[n:], torch.full((2, HQ, D), 7.0))  # padding rows untouched


@pytest.mark.parametrize("window", [1, 4])
def test_triton_write_and_attention_match_reference_with_window(window):
    from kernel_bounds import device_for_triton
    from rotkv_kernels.rotkv_paged_triton import paged_attention_triton, paged_write_triton

    dev = device_for_triton()
    spec = _spec(window)
    steps = Steps(spec, seed=20 + window)
    ref_cache = alloc_paged_cache(spec, 40, BS, torch.float32, fill=0xFF)
    cache = alloc_paged_cache(spec, 40, BS, torch.float32, dev, fill=0xFF)
    for chunks in SCHEDULE:
        st = steps.step(chunks)
        prev_ref = _write(spec, ref_cache, steps, st)
        on = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        dsteps = _on_device(steps, dev)
        prev = _write(spec, cache, dsteps, on, write=paged_write_triton)
        # Gaussian keys: the rotation's fp32 sums are ordered differently, so a few codes may sit on the other
        # side of a rounding boundary (test_rotkv_paged_triton bounds that); the full-precision area is copied
        # as given, so the sinks and rings must be identical.
        torch.testing.assert_close(cache.sinks.cpu(), ref_cache.sinks, rtol=0, atol=0, equal_nan=True)
        if prev is not None:
            assert torch.equal(prev.cpu(), prev_ref)
        cache.records.copy_(ref_cache.records.to(dev))  # attend over the same bytes
        ref = _ref(spec, ref_cache, steps, st, prev_ref)
        out = paged_attention_triton(on["query"], cache.records, dsteps.tables, on["seq_lens"], on["qsl"], spec=spec,
                                     scale=D ** -0.5, sinks=cache.sinks, rope_cos=dsteps.cos, rope_sin=dsteps.sin,
                                     key_perm=dsteps.perm, key_mean=dsteps.mean, out_dtype=torch.float32,
                                     precision="fp32", num_splits=2, recent_key=on["key"], recent_value=on["value"],
                                     recent_prev=prev)
        n = st["num_tokens"]
        # fp32 kernel vs the fp64 reference over at most ~60 keys with |v| < 5 (paged_cases.attention_bound derives
        # the general bound; with fp32 products it is below 1e-5 at these sizes).
        torch.testing.assert_close(out[:n].cpu(), ref[:n], rtol=0, atol=2e-5)


def _on_device(steps: Steps, dev) -> Steps:
    import copy

    s = copy.copy(steps)
    s.tables, s.cos, s.sin = steps.tables.to(dev), steps.cos.to(dev), steps.sin.to(dev)
    s.perm, s.mean = steps.perm.to(dev), steps.mean.to(dev)
    return s


@pytest.mark.parametrize("window", [1, 4])
def test_cpp_write_and_attention_match_reference_with_window(window):
    from rotkv_kernels.rotkv_paged_cpu import cpu_kernels_status, paged_attention_cpu, paged_write_cpu, recent_prev_cpu

    if cpu_kernels_status() is not None:
        pytest.fail(f"the C++ CPU kernels are not built: {cpu_kernels_status()}")
    spec = _spec(window)
    steps = Steps(spec, seed=30 + window)
    ref_cache = alloc_paged_cache(spec, 40, BS, torch.float32, fill=0xFF)
    cache = alloc_paged_cache(spec, 40, BS, torch.float32, fill=0xFF)
    for chunks in SCHEDULE:
        st = steps.step(chunks)
        prev_ref = _write(spec, ref_cache, steps, st)
        prev = _write(spec, cache, steps, st, write=paged_write_cpu, read=recent_prev_cpu)
        # The full-precision area (sinks and rings) is copied as given: identical bytes.
        torch.testing.assert_close(cache.sinks, ref_cache.sinks, rtol=0, atol=0, equal_nan=True)
        if prev is not None:
            assert torch.equal(prev, prev_ref)
        cache.records.copy_(ref_cache.records)  # attend over the same bytes (Gaussian keys: see the Triton test)
        ref = _ref(spec, ref_cache, steps, st, prev_ref)
        n = st["num_tokens"]
        out = torch.full((n + 2, HQ, D), 7.0)
        paged_attention_cpu(st["query"], cache.records, steps.tables, st["seq_lens"], st["qsl"], spec=spec,
                            scale=D ** -0.5, sinks=cache.sinks, rope_cos=steps.cos, rope_sin=steps.sin,
                            key_perm=steps.perm, key_mean=steps.mean, out_dtype=torch.float32, out=out,
                            num_splits=2, recent_key=st["key"], recent_value=st["value"], recent_prev=prev)
        # fp32 kernel vs the fp64 reference over at most ~60 keys of |v| < 5 (paged_cases.attention_bound derives
        # the general bound for the C++ kernels; below 1e-5 at these sizes).
        torch.testing.assert_close(out[:n], ref[:n], rtol=0, atol=2e-5)
        assert torch.equal(out[n:], torch.full((2, HQ, D), 7.0))


def test_cpp_ring_read_opcheck():
    """``rotkv::ring_prev_cpu`` through ``torch.library.opcheck`` (schema, fake implementation, no aliasing of its
    inputs), with and without ``before``."""
    import rotkv_kernels.rotkv_paged_cpu  # noqa: F401  (registers the ops and their fakes)

    _prev_reader("cpp")
    spec = _spec(4, sinks=1)
    cache = alloc_paged_cache(spec, 6, BS, torch.float32, fill=0)
    cache.sinks.normal_(generator=torch.Generator().manual_seed(0))
    tables = torch.tensor([[2, 3, 0], [4, 5, 1]], dtype=torch.int32)
    seq, qsl = torch.tensor([20, 3], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32)
    args = (cache.sinks, tables, seq, qsl, spec.sink_tokens, spec.ring_slots, BS)
    torch.library.opcheck(torch.ops.rotkv.ring_prev_cpu.default, args)
    before = torch.ops.rotkv.ring_prev_cpu(*args)
    torch.library.opcheck(torch.ops.rotkv.ring_prev_cpu.default, args + (before,))


def test_spec_counts_the_rings_in_the_page_and_validates_the_window():
    spec = _spec(4, sinks=2)
    assert (spec.ring_slots, spec.fp_slots) == (3, 5)
    # page = records + (S + R - 1) full-precision tokens of K and V in the model dtype
    assert spec.page_bytes(BS, torch.bfloat16) == BS * spec.record_bytes + 5 * 2 * spec.width * 2
    cache = alloc_paged_cache(spec, 3, BS, torch.bfloat16)
    assert tuple(cache.sinks.shape) == (3, 5, 2, H, D)
    assert cache.raw.numel() == 3 * spec.page_bytes(BS, torch.bfloat16)
    assert PagedCacheSpec.from_json(spec.to_json()) == spec
    assert _spec(1).ring_slots == 0  # a window of 1 reads the step's own token only: no ring
    assert _spec(1).page_bytes(BS, torch.float32) == _spec(0).page_bytes(BS, torch.float32)
    with pytest.raises(ValueError, match="recent_window"):
        _spec(-1)
    with pytest.raises(ValueError, match="ring slots"):
        alloc_paged_cache(_spec(BS + 2), 2, BS, torch.float32)
    # the attention refuses a window without the step's K/V, and K/V without a window
    st = Steps(spec).step(SCHEDULE[0])
    c = alloc_paged_cache(spec, 40, BS, torch.float32)
    with pytest.raises(ValueError, match="recent_key"):
        paged_attention_ref(st["query"], c.records, torch.zeros(3, 4, dtype=torch.int32), st["seq_lens"], st["qsl"],
                            spec=spec, scale=1.0, sinks=c.sinks)
    plain = alloc_paged_cache(_spec(0), 40, BS, torch.float32)
    with pytest.raises(ValueError, match="recent_window == 0"):
        paged_attention_ref(st["query"], plain.records, torch.zeros(3, 4, dtype=torch.int32), st["seq_lens"],
                            st["qsl"], spec=_spec(0), scale=1.0, sinks=plain.sinks, recent_key=st["key"],
                            recent_value=st["value"])
