"""The paged-cache references (``rotkv_paged``): spec, page layout, write by slot mapping and attention,
against independent computations (no Triton).

- the write equals the contiguous record encoder (``rotkv_write_ref``) applied to the pre-RoPE keys we
  started from (quarter-turn RoPE tables make the inverse RoPE exact), at exactly the tokens' slots;
- attention where every cached token is a sink equals float64 softmax attention of the given K/V;
- attention over a 4-bit cache built on the quantization grid equals fp64 attention over the original K/V
  up to derived fp32 rounding (and RoPE one position late breaks that bound by far);
- a mixed batch gives each request what it gets alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernel_bounds import U32, gamma, llama_cos_sin, ref_hadamard_terms
from paged_cases import POISON, PagedCase, apply_rope, quarter_turn_tables
from rotkv_kernels.hadamard import hadamard_transform_ref
from rotkv_kernels.rotkv_cache import rotkv_write_ref
from rotkv_kernels.rotkv_paged import (
    PAGED_SPEC_VERSION,
    PagedCacheSpec,
    alloc_paged_cache,
    paged_attention_ref,
    paged_cache_views,
    paged_decode_ref,
    paged_write_ref,
)


def test_spec_defaults_and_json_roundtrip():
    sp = PagedCacheSpec(num_kv_heads=8, head_dim=128, key_rot_width=1024, sink_tokens=4)
    assert sp.value_rot_width == 128 and sp.version == PAGED_SPEC_VERSION
    # 2 bits + fp16 scale and zero per 128 channels: 1024 * 2 / 8 + 8 * 4 bytes for K and for V
    assert sp.key_bytes == sp.value_bytes == 256 + 32 and sp.record_bytes == 576
    assert sp.page_bytes(16, torch.bfloat16) == 16 * 576 + 4 * 2 * 1024 * 2
    assert PagedCacheSpec.from_json(sp.to_json()) == sp
    odd = PagedCacheSpec(num_kv_heads=3, head_dim=64, key_group_size=64, value_group_size=64, key_bits=3,
                         value_bits=2)
    assert odd.record_bytes == odd.key_bytes + odd.value_bytes + (odd.key_bytes + odd.value_bytes) % 2


@pytest.mark.parametrize("kw, match", [
    (dict(key_rot_width=96), "key_rot_width=96"),
    (dict(key_rot_width=192), "key_rot_width=192"),  # 3 heads do not divide 2
    (dict(value_rot_width=32), "value_rot_width=32"),
    (dict(key_group_size=48), "key_group_size=48"),
    (dict(value_group_size=96), "value_group_size=96"),
    (dict(key_bits=5), "key_bits=5"),
    (dict(scale_format="int8"), "scale_format='int8'"),
    (dict(key_clip=0.0), "key_clip=0.0"),
    (dict(record_bytes=10), "record_bytes=10"),
    (dict(sink_tokens=-1), "sink_tokens=-1"),
    (dict(version=2), "version 2"),
])
def test_spec_rejects_bad_arguments(kw, match):
    base = dict(num_kv_heads=2, head_dim=64, key_group_size=64, value_group_size=64)
    with pytest.raises(ValueError, match=match):
        PagedCacheSpec(**dict(base, **kw))
    with pytest.raises(ValueError, match="unknown PagedCacheSpec fields"):
        PagedCacheSpec.from_dict(dict(base, bogus=1))


def test_alloc_pages_partition_into_records_and_sinks():
    """Every byte of every page belongs to exactly one slot or one sink entry; pages are ``page_bytes`` apart."""
    sp = PagedCacheSpec(num_kv_heads=2, head_dim=64, key_group_size=64, value_group_size=64, sink_tokens=3)
    c = alloc_paged_cache(sp, 5, 16, torch.bfloat16, fill=0)
    page = sp.page_bytes(16, torch.bfloat16)
    assert c.raw.numel() == 5 * page and c.records.stride(0) == page
    c.records.fill_(1)
    c.sinks.view(torch.uint8).fill_(2)
    counts = torch.bincount(c.raw.long(), minlength=3)
    assert counts.tolist() == [0, 5 * 16 * sp.record_bytes, 5 * 3 * 2 * 128 * 2]
    # the same views from vLLM's kv_cache tensor
    records, sinks = paged_cache_views(c.kv_cache, sp, torch.bfloat16)
    assert records.data_ptr() == c.records.data_ptr() and sinks.data_ptr() == c.sinks.data_ptr()
    assert sinks.stride() == c.sinks.stride()
    with pytest.raises(ValueError, match="kv_cache: expected uint8"):
        paged_cache_views(c.kv_cache[..., :-1], sp, torch.bfloat16)
    with pytest.raises(ValueError, match="block_size=2 is smaller than sink_tokens=3"):
        alloc_paged_cache(sp, 5, 2, torch.bfloat16)


@pytest.mark.parametrize("bits, fmt, rope_scale", [(2, "fp16", 1.0), (3, "fp8", 2.0)])
def test_write_ref_is_contiguous_encoder_at_slots(bits, fmt, rope_scale):
    gen = torch.Generator().manual_seed(bits)
    h, d, g = 4, 32, 2
    sp = PagedCacheSpec(num_kv_heads=h, head_dim=d, key_bits=bits, value_bits=bits, key_group_size=32,
                        value_group_size=64, key_rot_width=g * d, scale_format=fmt, sink_tokens=2,
                        record_bytes=0)
    sp = PagedCacheSpec.from_dict(dict(sp.to_dict(), record_bytes=sp.record_bytes + 4))  # padded slots
    bs, nb, t = 8, 10, 13
    cache = alloc_paged_cache(sp, nb, bs, torch.float32, fill=POISON)
    k_pre = torch.randint(-255, 256, (t, h, d), generator=gen).float() / 32
    v = torch.randint(-255, 256, (t, h, d), generator=gen).float() / 32
    mean = torch.randint(-64, 65, (h * d,), generator=gen).float() / 16
    perm = torch.cat([torch.randperm(g * d, generator=gen) + b * g * d for b in range(h // g)])
    cos, sin = quarter_turn_tables(40, d, gen, rope_scale)
    pos = torch.randint(0, 40, (t,), generator=gen)
    pos[:3] = torch.tensor([0, 1, 2])  # two sinks and one position just past them
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[5] = -1  # a padding token
    k_post = apply_rope(k_pre, cos[pos], sin[pos])
    paged_write_ref(k_post, v, slots, cache.records, spec=sp, positions=pos, sinks=cache.sinks, rope_cos=cos,
                    rope_sin=sin, key_perm=perm, key_mean=mean)
    keep = slots >= 0
    krec = rotkv_write_ref(k_pre[keep] - mean.view(h, d), bits=bits, group_size=32, rot_width=g * d, perm=perm,
                           clip_ratio=sp.key_clip, scale_format=fmt)
    vrec = rotkv_write_ref(v[keep], bits=bits, group_size=64, rot_width=d, clip_ratio=sp.value_clip,
                           scale_format=fmt)
    s = slots[keep]
    got = cache.records[s // bs, s % bs]
    assert torch.equal(got[:, : sp.key_bytes], krec)
    assert torch.equal(got[:, sp.key_bytes: sp.key_bytes + sp.value_bytes], vrec)
    assert (got[:, sp.key_bytes + sp.value_bytes:] == POISON).all()  # slot padding untouched
    # slots nobody wrote are untouched
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[s] = False
    assert (cache.records.reshape(nb * bs, -1)[untouched] == POISON).all()
    # sinks: tokens at positions 0 and 1 (post-RoPE K as given), in their own block's sink area
    for i in (0, 1):
        assert torch.equal(cache.sinks[slots[i] // bs, pos[i], 0], k_post[i])
        assert torch.equal(cache.sinks[slots[i] // bs, pos[i], 1], v[i])


def _sdpa64(q, k, v, scale, n_ctx):
    """fp64 causal GQA attention of the last ``len(q)`` positions of ``n_ctx`` over ``k, v [L, H, D]``."""
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, 1).transpose(0, 1)
    v = v.double().repeat_interleave(rep, 1).transpose(0, 1)
    qq = q.double().transpose(0, 1)
    n_q = q.shape[0]
    mask = torch.arange(n_ctx)[None, :] <= torch.arange(n_ctx - n_q, n_ctx)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


def test_all_sink_cache_is_exact_attention():
    """Sequences no longer than the sink count read only the full-precision side store: the result is exact
    attention of the given K/V (fp64 both sides; one rounding to fp32 at the end, ``u |o|``)."""
    sp = PagedCacheSpec(num_kv_heads=2, head_dim=32, key_group_size=32, value_group_size=32, sink_tokens=16)
    case = PagedCase(sp, torch.float32, 16, 6, ctx=[16, 5, 9], q_lens=[1, 5, 3], hq=6, dyadic=False,
                     rope="real").build()
    cache = case.new_cache()
    paged_write_ref(*case.write_args(cache), **case.write_kwargs(cache))
    got = paged_attention_ref(*case.attn_args(cache), **case.attn_kwargs(cache))
    t = case.t
    keep = t["slots"] >= 0
    start = 0
    qsl = t["qsl"].tolist()
    for r, length in enumerate(case.ctx):
        k = t["key"][keep][start:start + length]
        v = t["value"][keep][start:start + length]
        start += length
        want = _sdpa64(t["query"][qsl[r]:qsl[r + 1]], k, v, 32 ** -0.5, length)
        assert ((got[qsl[r]:qsl[r + 1]].double() - want).abs() <= U32 * want.abs() + 1e-12).all()
    assert (got[qsl[-1]:] == 0).all()


def _on_grid(n, width, block, gs, perm, gen):
    """fp32 inputs whose rotated (and permuted) values lie exactly on a 4-bit grid of each group.

    Per group: codes ``q`` in ``[0, 15]`` with 0 and 15 present, an integer zero ``z`` and a power-of-two scale
    ``s``, ``y = (q - z) s``; ``x = H^T unperm(y)`` in fp64, rounded to fp32. Encoding ``x`` (or anything within
    a few fp32 ulps of it) finds the same min/max, hence the same ``s``, ``z`` and codes, so the record
    decodes to ``y`` exactly: what remains is fp32 rounding.
    """
    q = torch.randint(0, 16, (n, width // gs, gs), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    z = torch.randint(0, 16, (n, width // gs, 1), generator=gen)
    s = 2.0 ** torch.randint(-4, -1, (n, width // gs, 1), generator=gen).double()
    y = ((q - z) * s).reshape(n, width)
    if perm is not None:
        un = torch.empty_like(y)
        un[:, perm] = y
        y = un
    return hadamard_transform_ref(y, block_size=block, inverse=True).float(), y


def test_attention_over_exactly_quantizable_cache_is_exact_attention():
    """4-bit K/V built on the quantization grid (``_on_grid``): the packed cache holds them exactly, so the
    reference's attention must equal fp64 attention over the original post-RoPE K and V up to fp32 rounding:
    per key and head ``||K^ - K||_2 <= m (sqrt(D) (gamma_K ||y||_1 / sqrt(rw) + u max|x|)) + 8 u m (||k|| +
    ||mu||)`` (the decode's butterflies, the construction's rounding, the mean add and both RoPE evaluations),
    the scores move by ``eps = scale ||q|| max ||K^ - K||``, the output by ``(e^{2 eps} - 1) max|v|`` plus the
    values' own decode error. Decoding one position off, or RoPE one angle late, breaks the bound."""
    gen = torch.Generator().manual_seed(11)
    h, d, g, bs, hq = 2, 64, 2, 16, 4
    sp = PagedCacheSpec(num_kv_heads=h, head_dim=d, key_bits=4, value_bits=4, key_group_size=64,
                        value_group_size=64, key_rot_width=g * d, key_clip=1.0, value_clip=1.0, sink_tokens=1)
    ctx, q_lens = [40, 23], [1, 4]
    n = sum(ctx)
    perm = torch.cat([torch.randperm(g * d, generator=gen) + b * g * d for b in range(h // g)])
    x, yk = _on_grid(n, h * d, g * d, 64, perm, gen)
    v, yv = _on_grid(n, h * d, d, 64, None, gen)
    v = v.reshape(n, h, d)
    mean = torch.randint(-32, 33, (h * d,), generator=gen).float() / 16
    cos, sin = llama_cos_sin(torch.arange(max(ctx) + 2), d)
    pos = torch.cat([torch.arange(c) for c in ctx])
    k_pre = x.reshape(n, h, d) + mean.view(h, d)
    k_post = apply_rope(k_pre, cos[pos], sin[pos])
    tables = torch.tensor([[5, 1, 7], [2, 0, 9]], dtype=torch.int32)
    req = torch.cat([torch.full((c,), r) for r, c in enumerate(ctx)])
    slots = tables[req, pos // bs].long() * bs + pos % bs
    cache = alloc_paged_cache(sp, 10, bs, torch.float32, fill=POISON)
    kw = dict(spec=sp, sinks=cache.sinks, rope_cos=cos, rope_sin=sin, key_perm=perm, key_mean=mean)
    paged_write_ref(k_post, v, slots, cache.records, positions=pos, **kw)
    qsl = torch.tensor([0, q_lens[0], sum(q_lens)])
    query = torch.randn(sum(q_lens), hq, d, generator=gen)
    got = paged_attention_ref(query, cache.records, tables, torch.tensor(ctx), qsl, scale=d ** -0.5,
                              out_dtype=torch.float32, **kw)
    m = float((cos**2 + sin**2).sqrt().max())
    k_rw = ref_hadamard_terms(g * d)
    y1k = yk.abs().reshape(n, h // g, g * d).sum(-1).repeat_interleave(g, 1)  # [n, H]
    e_k = m * math.sqrt(d) * (gamma(k_rw) * y1k / math.sqrt(g * d) + U32 * float(x.abs().max()))
    e_k = e_k + 8 * U32 * m * (k_pre.double().norm(dim=-1) + mean.double().view(h, d).norm(dim=-1))
    e_v = gamma(ref_hadamard_terms(d)) * yv.abs().reshape(n, h, d).sum(-1) / math.sqrt(d) + U32 * v.abs().amax(-1)
    start = 0
    for r, length in enumerate(ctx):
        sl = slice(start, start + length)
        start += length
        q = query[qsl[r]:qsl[r + 1]]
        want = _sdpa64(q, k_post[sl], v[sl], d ** -0.5, length)
        ekr, evr = e_k[sl].clone(), e_v[sl].clone()
        ekr[: sp.sink_tokens] = 0  # sinks are exact
        evr[: sp.sink_tokens] = 0
        eps = d ** -0.5 * q.double().norm(dim=-1) * float(ekr.max())  # [n_q, Hq]
        vmax = float(v[sl].abs().max())
        bound = torch.expm1(2 * eps)[..., None] * vmax + float(evr.max()) + U32 * (want.abs() + vmax) + 1e-30
        err = (got[qsl[r]:qsl[r + 1]].double() - want).abs()
        assert (err <= bound).all()
        # teeth: RoPE one position late, or every key read from its neighbour, is far outside the bound
        late = apply_rope(k_pre[sl], cos[1:length + 1], sin[1:length + 1])
        assert ((_sdpa64(q, late, v[sl], d ** -0.5, length) - want).abs() > 100 * bound).any()
        shifted = torch.cat([k_post[sl][1:], k_post[sl][-1:]])
        assert ((_sdpa64(q, shifted, v[sl], d ** -0.5, length) - want).abs() > 100 * bound).any()


def test_mixed_batch_equals_each_request_alone_and_decode_alias():
    sp = PagedCacheSpec(num_kv_heads=2, head_dim=32, key_group_size=32, value_group_size=32, key_rot_width=64,
                        sink_tokens=2)
    case = PagedCase(sp, torch.bfloat16, 16, 10, ctx=[33, 1, 20], q_lens=[1, 1, 6], hq=4, dyadic=False,
                     rope="real", seed=5).build()
    cache = case.new_cache()
    paged_write_ref(*case.write_args(cache), **case.write_kwargs(cache))
    kw = case.attn_kwargs(cache)
    t = case.t
    whole = paged_attention_ref(*case.attn_args(cache), **kw)
    qsl = t["qsl"].tolist()
    for r in range(len(case.ctx)):
        alone = paged_attention_ref(t["query"][qsl[r]:qsl[r + 1]], cache.records, t["tables"][r:r + 1],
                                    t["seq_lens"][r:r + 1], torch.tensor([0, qsl[r + 1] - qsl[r]]), **kw)
        assert torch.equal(alone, whole[qsl[r]:qsl[r + 1]])
    dec = paged_decode_ref(t["query"][:2], cache.records, t["tables"][:2], t["seq_lens"][:2], **kw)
    assert torch.equal(dec, whole[:2])
    with pytest.raises(ValueError, match="request 0: 3 queries but seq_lens=2"):
        paged_attention_ref(t["query"][:3], cache.records, t["tables"][:1], torch.tensor([2]),
                            torch.tensor([0, 3]), **kw)
    with pytest.raises(ValueError, match="query has 3 heads"):
        paged_attention_ref(t["query"][:, :3], cache.records, t["tables"], t["seq_lens"], t["qsl"], **kw)
    with pytest.raises(ValueError, match="sinks: spec.sink_tokens=2"):
        paged_attention_ref(*case.attn_args(cache), **dict(kw, sinks=None))
    with pytest.raises(ValueError, match="rope_cos and rope_sin"):
        paged_attention_ref(*case.attn_args(cache), **dict(kw, rope_sin=None))
    assert math.isfinite(float(whole.float().abs().max()))
