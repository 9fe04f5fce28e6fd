"""The paged kernels' layout is the vLLM backend's: driven step by step through the real backend
(``rotkv_vllm.vllm_backend``: vLLM's metadata builder, ``store`` and its CPU attention), the cache the
backend writes is byte for byte what ``paged_write_ref`` writes, its views are ``paged_cache_views``, and its
outputs are ``paged_attention_ref``'s over the same cache (the Triton kernels are held to
``paged_attention_ref`` in ``test_rotkv_paged_triton``). A sliding-window layer goes through vLLM's
``SlidingWindowSpec`` group, with the pages before each request's window swapped for a poisoned null block in its
block table (as vLLM frees them), on the C++ and PyTorch paths.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from rotkv_kernels.rotkv_paged import (  # noqa: E402
    PagedCacheSpec,
    alloc_paged_cache,
    paged_attention_ref,
    paged_cache_views,
    paged_write_ref,
    recent_prev_ref,
)
from rotkv_kernels.rotkv_cache import rotate_half  # noqa: E402
from rotkv_vllm import vllm_backend as vb  # noqa: E402
from rotkv_vllm.calibration import RotateKVCalibration  # noqa: E402
from rotkv_vllm.config import RotateKVConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _no_runtime_leak():
    yield
    vb.install_runtime(None)


def _runtime(cfg: RotateKVConfig, kv_heads=2, d=64, g=2, seed=0, sliding_window=0):
    gen = torch.Generator().manual_seed(seed)
    w = kv_heads * d
    order = torch.cat([torch.randperm(g * d, generator=gen) + j * g * d for j in range(kv_heads // g)])
    info = dict(model_type="llama", num_hidden_layers=1, num_attention_heads=2 * kv_heads,
                num_key_value_heads=kv_heads, head_dim=d, hidden_size=2 * kv_heads * d)
    calib = RotateKVCalibration(config=cfg, model_info=info, head_group_size=g, key_orders=[order.to(torch.int64)],
                                key_means=[torch.randn(w, generator=gen)])
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(512, dtype=torch.float64)[:, None] * inv[None]
    rope = (torch.cat([f.cos(), f.cos()], -1).float(), torch.cat([f.sin(), f.sin()], -1).float())
    return vb.RotateKVRuntime.from_calibration(calib, f"rotkv{cfg.key_bits}", dtype=torch.bfloat16, rope=rope,
                                               sliding_windows=[sliding_window] if sliding_window else None)


def spec_of(rt) -> PagedCacheSpec:
    """The kernels' description of layer 0 of a backend runtime."""
    lay, cfg, codec = rt.layout, rt.config, rt.codec(0)
    return PagedCacheSpec(
        num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, key_bits=codec.key_bits, value_bits=codec.value_bits,
        key_group_size=lay.group_size, value_group_size=lay.value_group_size, key_rot_width=lay.group_width,
        value_rot_width=lay.head_dim if cfg.rotate_values else 1, key_clip=codec.key_clip,
        value_clip=codec.value_clip, scale_format=cfg.scale_format, record_bytes=rt.record_bytes,
        sink_tokens=rt.sink_tokens, recent_window=rt.recent_window, sliding_window=rt.sliding_window(0),
    )


CONFIGS = {
    "k2v2-sinks-centered": RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=3, center_keys=True,
                                                   group_size=64, value_group_size=32),
    "k3-fp8-nosink-postrope": RotateKVConfig.for_bits(3, sink_mode="none", scale_format="fp8", pre_rope=False,
                                                      rotate_values=False),
}


@pytest.mark.parametrize("name,sw,impl_name", [(n, 0, "auto") for n in CONFIGS]
                         + [("k2v2-sinks-centered", 20, "cpp"), ("k2v2-sinks-centered", 20, "torch")])
def test_backend_cache_and_outputs_are_the_kernels_layout(name, sw, impl_name, monkeypatch):
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, impl_name)
    rt = _runtime(CONFIGS[name], sliding_window=sw)
    sp = spec_of(rt)
    bs, nb, heads = 16, 24, 4
    cache = alloc_paged_cache(sp, nb, bs, torch.bfloat16, fill=0xFF)
    mine = alloc_paged_cache(sp, nb, bs, torch.bfloat16, fill=0xFF)
    vb.install_runtime(rt)
    kw_spec = dict(block_size=bs, num_kv_heads=sp.num_kv_heads, head_size=sp.head_dim, dtype=torch.uint8)
    spec = vb.RotateKVAttentionBackend.customize_spec(
        SlidingWindowSpec(sliding_window=sw, **kw_spec) if sw else FullAttentionSpec(**kw_spec))
    assert spec.page_size_bytes == sp.page_bytes(bs, torch.bfloat16)  # vLLM sizes our pages
    assert (getattr(spec, "sliding_window", None) or 0) == sw  # the group keeps its window
    builder = vb.RotateKVAttentionMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], None,
                                                  torch.device("cpu"), runtime=rt)
    assert builder.attention_impl == (impl_name if impl_name != "auto" else builder.attention_impl)
    impl = vb.RotateKVAttentionImpl(heads, sp.head_dim, sp.head_dim ** -0.5, sp.num_kv_heads, None, sw or None,
                                    f"rotkv{rt.config.key_bits}", runtime=rt)
    impl._layer = 0
    records, sinks = impl._cache_views(cache.kv_cache)
    mr, ms = paged_cache_views(cache.kv_cache, sp, torch.bfloat16)
    assert records.data_ptr() == mr.data_ptr() and records.stride() == mr.stride()
    assert (sinks is None) == (ms is None) and (sinks is None or sinks.data_ptr() == ms.data_ptr())

    gen = torch.Generator().manual_seed(1)
    free = torch.randperm(nb, generator=gen).tolist()
    null = free.pop(0)  # never written: every byte 0xFF, NaN if read
    tables: dict[str, list[int]] = {}
    lens: dict[str, int] = {}
    layer = type("L", (), {"layer_name": "model.layers.0.self_attn.attn"})()
    for work in ({"a": 37, "b": 5}, {"a": 1, "b": 12, "c": 20}, {"c": 1, "a": 1, "b": 1, "d": 2}):
        names = list(work)
        before = [lens.get(n, 0) for n in names]
        seq = [b + work[n] for b, n in zip(before, names)]
        for n, s in zip(names, seq):
            tab = tables.setdefault(n, [])
            while len(tab) * bs < s:
                tab.append(free.pop())
            lens[n] = s
        table = torch.zeros(len(names), max(len(tables[n]) for n in names) + 1, dtype=torch.int32)
        for i, n in enumerate(names):
            table[i, : len(tables[n])] = torch.tensor(tables[n])
            if sw:  # vLLM frees the pages before the window of the step's first query to its null block
                table[i, : max(0, before[i] - sw + 1) // bs] = null
        slots, pos = [], []
        for i, n in enumerate(names):
            for p in range(before[i], seq[i]):
                slots.append(tables[n][p // bs] * bs + p % bs)
                pos.append(p)
        t = len(slots)
        slot_mapping = torch.tensor(slots + [-1, -1], dtype=torch.int64)  # vLLM pads the token count
        positions = torch.tensor(pos + [0, 0])
        qsl = torch.tensor([0] + torch.tensor([work[n] for n in names]).cumsum(0).tolist(), dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=len(names), num_actual_tokens=t, max_query_len=max(work.values()), max_seq_len=max(seq),
            block_table_tensor=table, slot_mapping=slot_mapping,
        )
        md = builder.build(0, cm)
        assert torch.equal(md.positions, positions[:t])
        k_pre = torch.randn(t + 2, sp.num_kv_heads, sp.head_dim, generator=gen)
        k_pre[:, :, 5] += 3.0
        if rt.config.pre_rope:
            c, s_ = rt.rope(0)[0][positions][:, None], rt.rope(0)[1][positions][:, None]
            k = (k_pre * c + rotate_half(k_pre) * s_).to(torch.bfloat16)
        else:
            k = k_pre.to(torch.bfloat16)
        v = torch.randn(t + 2, sp.num_kv_heads, sp.head_dim, generator=gen).to(torch.bfloat16)
        q = torch.randn(t + 2, heads, sp.head_dim, generator=gen).to(torch.bfloat16)
        out = torch.full((t + 2, heads, sp.head_dim), float("nan"), dtype=torch.bfloat16)
        impl.forward(layer, q, k, v, cache.kv_cache, md, out)

        codec = rt.codec(0)
        rope = rt.rope(0)
        kw = dict(spec=sp, sinks=mine.sinks, rope_cos=rope[0], rope_sin=rope[1], key_perm=codec.key_order,
                  key_mean=codec.key_mean)
        seq_lens = torch.tensor(seq, dtype=torch.int32)
        window = {}
        if sp.ring_slots:  # the recent window: rings read around the write, as the backend does
            before = recent_prev_ref(mine.sinks, table, seq_lens, qsl, spec=sp, block_size=bs)
        paged_write_ref(k, v, slot_mapping, mine.records, positions=positions, **kw)
        if impl_name != "cpp":  # (the C++ write's rotation sums are ordered differently: records may differ)
            assert torch.equal(mine.raw, cache.raw)  # the whole cache (records, sinks, rings), byte for byte
        if sp.ring_slots:
            prev = recent_prev_ref(mine.sinks, table, seq_lens, qsl, spec=sp, block_size=bs, before=before)
            window = dict(recent_key=k[:t], recent_value=v[:t], recent_prev=prev)

        ref = paged_attention_ref(q[:t], cache.records, table, seq_lens, qsl, scale=sp.head_dim ** -0.5,
                                  out_dtype=torch.float32, **dict(kw, sinks=sinks), **window).double()
        # Same bytes, same dequantization; the backend then runs fp32 SDPA and rounds to bf16. As in
        # tests/rotkv_vllm/test_vllm_backend.py: bf16 rounding of outputs of magnitude <= max|ref| is at most
        # 2^-8 max|ref|, and the fp32 arithmetic stays far below the 1e-5 added for it.
        bound = 2.0**-8 * float(ref.abs().max()) + 1e-5
        assert float((out[:t].double() - ref).abs().max()) <= bound
        assert torch.isnan(out[t:].float()).all()  # padded tokens untouched
