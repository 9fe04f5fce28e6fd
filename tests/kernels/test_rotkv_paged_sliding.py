"""Sliding-window attention over the paged cache (``PagedCacheSpec.sliding_window``), step by step as vLLM drives a
sliding-window KV-cache group.

A query at position ``t`` attends keys ``t - SW < j <= t`` (vLLM's ``SlidingWindowSpec`` and transformers'
convention). Before each step the blocks that lie wholly before the window of a request's first query are
replaced in its block table by a *null block* that was never written (every byte 0xFF: NaN scales and NaN
sink/ring values), as vLLM's ``SlidingWindowManager.remove_skipped_blocks`` does; any read of it shows up as NaN
in the output. Windows start mid-block and on block boundaries, with and without the recent window and sinks
(which fall out of the window like any other position), over chunked prefill chunks and decode steps.

Checked: the reference against a dense oracle that masks the window itself (fp64 both, the same decoded
records), and the CPU tiles path, the C++ kernel and the Triton kernels (interpreted) against the reference.
"""

from __future__ import annotations

import pytest
import torch

from rotkv_kernels.rotkv_paged import PagedCacheSpec, alloc_paged_cache, recent_window_kv
from rotkv_kernels.rotkv_paged_tiles import CpuReadTables, attend_tiles, build_tile, interleave_order, plan_tiles
from test_rotkv_paged_window import BS, D, H, HQ, Steps, _on_device, _oracle, _ref, _write

# Chunk lengths per step (0: not scheduled): long enough that windows of 5-20 positions free several blocks,
# chunks that start mid-block and on block boundaries (16, 32, 48), decode steps at the end.
SCHEDULE = [
    [7, 16, 0],
    [13, 9, 16],
    [2, 7, 3],
    [30, 1, 13],
    [1, 1, 1],
    [12, 40, 1],
    [1, 1, 33],
    [1, 2, 1],
    [1, 1, 1],
]
NUM_BLOCKS = 24
# (sliding window, recent window, sinks): a window ending mid-block, one block exactly, a window that reaches back
# into the previous block only, and the smallest window the recent window allows.
CASES = [(20, 4, 1), (16, 4, 2), (16, 0, 1), (5, 4, 1), (33, 1, 0)]


def _spec(sw: int, window: int, sinks: int) -> PagedCacheSpec:
    return PagedCacheSpec(num_kv_heads=H, head_dim=D, key_bits=2, value_bits=2, key_group_size=32,
                          value_group_size=64, key_rot_width=2 * D, scale_format="fp16", sink_tokens=sinks,
                          recent_window=window, sliding_window=sw)


class SlidingSteps(Steps):
    """:class:`Steps` whose block tables lose the blocks that left every future window to a poisoned null block."""

    def __init__(self, spec: PagedCacheSpec, seed: int):
        super().__init__(spec, seed=seed, num_blocks=NUM_BLOCKS, schedule=SCHEDULE)
        used = set(self.tables.flatten().tolist())
        self.null = min(set(range(NUM_BLOCKS)) - used)  # never written: its bytes stay 0xFF
        self.freed = 0

    def step(self, chunks: list[int]) -> dict:
        # vLLM frees before it schedules the step: blocks wholly before (first position - SW + 1)
        for r, n in enumerate(chunks):
            if n == 0:
                continue
            skipped = max(0, self.done[r] - self.spec.sliding_window + 1)
            for b in range(skipped // BS):
                if self.tables[r, b] != self.null:
                    self.tables[r, b] = self.null
                    self.freed += 1
        return super().step(chunks)


def _run(spec: PagedCacheSpec, seed: int, check):
    """Drive the schedule; ``check(steps, cache, st, prev, ref)`` after each step's write."""
    steps = SlidingSteps(spec, seed)
    steps.full_tables = steps.tables.clone()  # the oracle's view: nothing freed
    cache = alloc_paged_cache(spec, NUM_BLOCKS, BS, torch.float32, fill=0xFF)
    for chunks in SCHEDULE:
        st = steps.step(chunks)
        prev = _write(spec, cache, steps, st) if spec.recent_window else None
        if not spec.recent_window:
            _write(spec, cache, steps, st)
        ref = _ref_any(spec, cache, steps, st, prev)
        assert not ref[: st["num_tokens"]].isnan().any(), "the reference read a freed (null) block"
        check(steps, cache, st, prev, ref)
    assert steps.freed >= 6, "the schedule must free blocks for the test to mean anything"


def _ref_any(spec, cache, steps, st, prev):
    if spec.recent_window:
        return _ref(spec, cache, steps, st, prev)
    from rotkv_kernels.rotkv_paged import paged_attention_ref

    return paged_attention_ref(st["query"], cache.records, steps.tables, st["seq_lens"], st["qsl"], spec=spec,
                               scale=D ** -0.5, sinks=cache.sinks, rope_cos=steps.cos, rope_sin=steps.sin,
                               key_perm=steps.perm, key_mean=steps.mean, out_dtype=torch.float32)


def _recent_kwargs(spec, st, prev) -> dict:
    if not spec.recent_window:
        return {}
    return dict(recent_key=st["key"], recent_value=st["value"], recent_prev=prev)


@pytest.mark.parametrize("sw,window,sinks", CASES)
def test_reference_equals_dense_oracle_and_never_reads_freed_blocks(sw, window, sinks):
    spec = _spec(sw, window, sinks)

    def check(steps, cache, st, prev, ref):
        n = st["num_tokens"]
        # Same decoded records and original K/V on both sides in fp64; one fp32 rounding of |out| < 8.
        # The oracle reads the records through the never-freed tables and masks the window itself.
        want = _oracle(spec, cache, steps, st, tables=steps.full_tables)
        torch.testing.assert_close(ref[:n].double(), want[:n], rtol=0, atol=5e-7)

    _run(spec, sw + window, check)


@pytest.mark.parametrize("sw,window,sinks", CASES)
def test_tiles_path_matches_reference(sw, window, sinks):
    spec = _spec(sw, window, sinks)

    def check(steps, cache, st, prev, ref):
        tables = CpuReadTables.build(spec, key_perm=steps.perm, key_mean=steps.mean,
                                     channel_order=interleave_order(H, D),
                                     rope=CpuReadTables.rope_table(steps.cos, steps.sin))
        qsl, seq = st["qsl"].long(), st["seq_lens"].long()
        q_lens = qsl[1:] - qsl[:-1]
        # small budgets: requests split into query ranges, each with its own window start
        plan = plan_tiles(q_lens.tolist(), seq.tolist(), context_budget=60, score_budget=500, sliding_window=sw)
        tiles = [build_tile(torch.tensor(r), lo, hi, qsl, q_lens, seq, steps.tables.long(), BS, sliding_window=sw)
                 for r, lo, hi in plan]
        n = st["num_tokens"]
        recent = None
        if window:
            recent = recent_window_kv(st["key"], st["value"], prev, qsl, seq, n, window)
        out = torch.full((n + 2, HQ, D), 7.0)
        attend_tiles(st["query"], cache.records, cache.sinks, tiles, tables, scale=D ** -0.5, output=out,
                     recent=recent)
        # fp32 against fp64 over at most ~40 keys of |v| < 5: a few fp32 roundings of values below 5 each.
        torch.testing.assert_close(out[:n], ref[:n], rtol=0, atol=2e-5)
        assert torch.equal(out[n:], torch.full((2, HQ, D), 7.0))
        with pytest.raises(ValueError, match="sliding_window"):  # tiles planned for another window
            plain = [build_tile(torch.tensor(r), lo, hi, qsl, q_lens, seq, steps.tables.long(), BS)
                     for r, lo, hi in plan]
            attend_tiles(st["query"], cache.records, cache.sinks, plain, tables, scale=D ** -0.5, output=out,
                         recent=recent)

    _run(spec, 100 + sw + window, check)


@pytest.mark.parametrize("sw,window,sinks", CASES)
def test_cpp_attention_matches_reference(sw, window, sinks):
    from rotkv_kernels.rotkv_paged_cpu import cpu_kernels_status, paged_attention_cpu

    if cpu_kernels_status() is not None:
        pytest.fail(f"the C++ CPU kernels are not built: {cpu_kernels_status()}")
    spec = _spec(sw, window, sinks)

    def check(steps, cache, st, prev, ref):
        n = st["num_tokens"]
        for splits in (1, 3):
            out = torch.full((n + 2, HQ, D), 7.0)
            paged_attention_cpu(st["query"], cache.records, steps.tables, st["seq_lens"], st["qsl"], spec=spec,
                                scale=D ** -0.5, sinks=cache.sinks, rope_cos=steps.cos, rope_sin=steps.sin,
                                key_perm=steps.perm, key_mean=steps.mean, out_dtype=torch.float32, out=out,
                                num_splits=splits, **_recent_kwargs(spec, st, prev))
            # fp32 kernel vs the fp64 reference over at most ~40 keys with |v| < 5 (paged_cases.attention_bound
            # derives the general bound for the C++ kernels; below 1e-5 at these sizes).
            torch.testing.assert_close(out[:n], ref[:n], rtol=0, atol=2e-5)
            assert torch.equal(out[n:], torch.full((2, HQ, D), 7.0))

    _run(spec, 200 + sw + window, check)


@pytest.mark.parametrize("sw,window,sinks", CASES[:2])
def test_triton_attention_matches_reference(sw, window, sinks):
    from kernel_bounds import device_for_triton
    from rotkv_kernels.rotkv_paged_triton import paged_attention_triton

    dev = device_for_triton()
    spec = _spec(sw, window, sinks)

    def check(steps, cache, st, prev, ref):
        on = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        ds = _on_device(steps, dev)
        rec = {k: (v.to(dev) if v is not None else None) for k, v in _recent_kwargs(spec, st, prev).items()}
        out = paged_attention_triton(on["query"], cache.records.to(dev), ds.tables, on["seq_lens"], on["qsl"],
                                     spec=spec, scale=D ** -0.5, sinks=cache.sinks.to(dev), rope_cos=ds.cos,
                                     rope_sin=ds.sin, key_perm=ds.perm, key_mean=ds.mean, out_dtype=torch.float32,
                                     precision="fp32", num_splits=2, **rec)
        n = st["num_tokens"]
        torch.testing.assert_close(out[:n].cpu(), ref[:n], rtol=0, atol=2e-5)

    _run(spec, 300 + sw + window, check)


def test_spec_validates_the_sliding_window():
    assert _spec(20, 4, 1).sliding_window == 20
    assert PagedCacheSpec.from_json(_spec(20, 4, 1).to_json()) == _spec(20, 4, 1)
    with pytest.raises(ValueError, match="recent_window"):
        _spec(3, 4, 1)  # the recent window must lie inside the sliding window
    with pytest.raises(ValueError, match="sliding_window"):
        _spec(-1, 0, 1)
