"""Triton paged-cache kernels against the references of ``rotkv_paged`` (``TRITON_INTERPRET=1`` on the CPU, or CUDA).

- Writes are compared byte for byte over the whole cache (every page, the untouched bytes included) with
  inputs whose rotation sums are exact in fp32 (dyadic keys/values, quarter-turn RoPE tables, dyadic key
  means): the records must be identical, the padding tokens (slot -1) must leave no trace, and the sink
  area must hold the given K/V. With Gaussian keys and real RoPE tables, codes may differ only where the
  reference's ``y / s`` sits at a rounding boundary (the fp32 sums of the rotation are ordered differently).
- Attention is compared with ``paged_attention_ref`` within ``paged_cases.attention_bound`` (derived there),
  for both precisions, on mixed batches (decodes, a prefill chunk over earlier chunks, a new prefill) with
  odd context lengths, scattered blocks, sinks, an odd block size and split-K.
- One cache is larger than 2^31 bytes (its pages are not committed until touched): blocks past 2 GiB are
  written and read, which goes wrong if any offset is computed in 32 bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernel_bounds import U32, decode_rotated, device_for_triton, gamma, ref_hadamard_terms, triton_hadamard_terms
from paged_cases import PagedCase, attention_bound
from rotkv_kernels.hadamard import hadamard_transform_ref
from rotkv_kernels.rotkv_paged import (
    PagedCacheSpec,
    alloc_paged_cache,
    inverse_rope_ref,
    paged_attention,
    paged_attention_ref,
    paged_write,
    paged_write_ref,
)


@pytest.fixture(scope="module")
def device():
    return device_for_triton()


def _spec(h, d, g, gs, vgs, bits, fmt="fp16", sinks=0, vrot=True, pad=0, vbits=None):
    sp = PagedCacheSpec(num_kv_heads=h, head_dim=d, key_bits=bits, value_bits=vbits or bits, key_group_size=gs,
                        value_group_size=vgs, key_rot_width=g * d, value_rot_width=d if vrot else 1,
                        key_clip=0.8 if bits == 2 else 1.0, value_clip=0.8 if bits == 2 else 1.0, scale_format=fmt,
                        sink_tokens=sinks)
    if pad:
        sp = PagedCacheSpec.from_dict(dict(sp.to_dict(), record_bytes=sp.record_bytes + pad))
    return sp


# Write cases: Llama-3-8B heads (8 x 128 rotated together, width 1024) in bf16; SmolLM2-like 3 x 64 (192, a
# Paley order) at 3 bits with fp8 scales, RoPE scaled by 2 and an odd block size; a small 4-bit layout with
# unrotated values, keys stored post-RoPE and a padded slot.
WRITE_CASES = {
    "llama3-2bit-bf16": PagedCase(_spec(8, 128, 8, 128, 128, 2, sinks=4), torch.bfloat16, 16, 9,
                                  ctx=[37, 1, 21], q_lens=[1, 1, 5], hq=32),
    "smollm-3bit-fp8": PagedCase(_spec(3, 64, 3, 64, 192, 3, "fp8", sinks=2), torch.float32, 7, 14,
                                 ctx=[23, 30], q_lens=[1, 4], hq=9, rope_scale=2.0, mean=False),
    "4bit-postrope-vnorot": PagedCase(_spec(2, 32, 1, 32, 16, 4, vrot=False, pad=6), torch.float16, 16, 6,
                                      ctx=[19, 33], q_lens=[2, 1], hq=2, rope="none"),
}


@pytest.mark.parametrize("name", list(WRITE_CASES))
def test_write_bit_exact_whole_cache(device, name):
    case = WRITE_CASES[name].build(device)
    ref = case.new_cache("cpu")
    got = case.new_cache(device)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.t.items()}
    saved, case.t = case.t, cpu
    paged_write_ref(*case.write_args(ref), **case.write_kwargs(ref))
    case.t = saved
    paged_write(*case.write_args(got), **case.write_kwargs(got))
    assert torch.equal(got.raw.cpu(), ref.raw)
    # the reference is not vacuous: every written slot changed, the sink area holds the given K/V
    written = cpu["slots"][cpu["slots"] >= 0]
    bs = case.block_size
    recs = ref.records[written // bs, written % bs, : case.spec.key_bytes + case.spec.value_bytes]
    assert (recs != 0xFF).any(dim=1).all()
    if case.spec.sink_tokens:
        keep = (cpu["slots"] >= 0) & (cpu["positions"] < case.spec.sink_tokens)
        s = cpu["slots"][keep]
        assert torch.equal(ref.sinks[s // bs, cpu["positions"][keep], 0], cpu["key"][keep].to(case.dtype))
        assert torch.equal(ref.sinks[s // bs, cpu["positions"][keep], 1], cpu["value"][keep].to(case.dtype))


def test_write_gaussian_real_rope_codes_differ_only_at_rounding_boundaries(device):
    """Gaussian keys, real RoPE tables: inverse RoPE rounds identically (same fp32 operations, no FMA); the
    rotation's sums differ in order by at most both Hadamard bounds ``delta``, so a code may differ only where
    the exact ``y / s`` is within ``delta / s`` of a .5 boundary, and by one step."""
    case = PagedCase(_spec(8, 128, 8, 128, 128, 2, sinks=0), torch.float32, 16, 8, ctx=[45, 30], q_lens=[1, 1],
                     hq=32, dyadic=False, rope="real", seed=3).build(device)
    ref, got = case.new_cache("cpu"), case.new_cache(device)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.t.items()}
    saved, case.t = case.t, cpu
    paged_write_ref(*case.write_args(ref), **case.write_kwargs(ref))
    case.t = saved
    paged_write(*case.write_args(got), **case.write_kwargs(got))
    sp = case.spec
    keep = cpu["slots"] >= 0
    s = cpu["slots"][keep]
    bs = case.block_size
    r_ref = ref.records[s // bs, s % bs]
    r_got = got.records.cpu()[s // bs, s % bs]
    w, rw = sp.width, sp.key_rot_width
    for lo, hi, bits, gs, x, perm in (
        (0, sp.key_bytes, sp.key_bits, sp.key_group_size,
         inverse_rope_ref(cpu["key"][keep], cpu["cos"][cpu["positions"][keep]], cpu["sin"][cpu["positions"][keep]])
         - cpu["mean"].view(sp.num_kv_heads, sp.head_dim), cpu["perm"]),
        (sp.key_bytes, sp.key_bytes + sp.value_bytes, sp.value_bits, sp.value_group_size,
         cpu["value"][keep].float(), None),
    ):
        block = rw if perm is not None else sp.value_rot_width
        deq_ref, s_ref, z_ref = decode_rotated(r_ref[:, lo:hi], w, bits, gs, sp.scale_format)
        deq, s_tri, z_tri = decode_rotated(r_got[:, lo:hi], w, bits, gs, sp.scale_format)
        same_group = (s_ref == s_tri) & (z_ref == z_tri)
        assert same_group.float().mean() >= 0.99
        n = x.shape[0]
        y64 = hadamard_transform_ref(x.double().reshape(n, w), block_size=block)
        xb = x.double().reshape(n, w // block, block).abs().sum(-1, keepdim=True)
        delta = ((gamma(ref_hadamard_terms(block)) + gamma(triton_hadamard_terms(block))) * xb / block**0.5)
        delta = delta.expand(n, w // block, block).reshape(n, w)
        if perm is not None:
            y64, delta = y64[:, perm], delta[:, perm]
        sc = s_ref.double().repeat_interleave(gs, -1)
        v = y64 / sc
        near = (v - v.floor() - 0.5).abs() <= 2 * delta / sc + 2 * U32 * v.abs() + 1e-6
        same = same_group.repeat_interleave(gs, -1)
        differ = deq_ref != deq
        assert not (differ & same & ~near).any()
        assert differ.float().mean() <= 1e-3
        assert ((deq_ref - deq).abs()[same].double() <= sc[same] * (1 + 2**-20)).all()


# Attention cases: mixed batches (decode with odd contexts, a decode whose context is one token, a prefill
# chunk over earlier chunks, a new prefill), scattered blocks, poisoned unwritten slots.
ATTN_CASES = {
    "llama3-gqa4-sinks": PagedCase(_spec(8, 128, 8, 128, 128, 2, sinks=4), torch.bfloat16, 16, 12,
                                   ctx=[37, 1, 21, 19], q_lens=[1, 1, 5, 19], hq=32, dyadic=False, rope="real"),
    "smollm-paley192-unaligned-groups": PagedCase(_spec(3, 64, 3, 192, 192, 2, sinks=2), torch.bfloat16, 16, 14,
                                                  ctx=[29, 133], q_lens=[1, 3], hq=9, dyadic=False, rope="real",
                                                  mean=False, seed=1),
    "mha-3bit-fp8-postrope-vnorot": PagedCase(_spec(2, 32, 1, 32, 16, 3, "fp8", vrot=False), torch.float16, 16, 8,
                                              ctx=[41, 17], q_lens=[1, 17], hq=2, dyadic=False, rope="none", seed=2),
    "4bit-blocksize7-g2": PagedCase(_spec(4, 64, 2, 64, 128, 4, sinks=3), torch.float32, 7, 20,
                                    ctx=[3, 50, 26], q_lens=[3, 1, 6], hq=8, dyadic=False, rope="real", seed=4),
    "d256-two-stage-value-rotation": PagedCase(_spec(1, 256, 1, 128, 64, 2, sinks=1), torch.bfloat16, 16, 6,
                                               ctx=[35, 12], q_lens=[1, 2], hq=4, dyadic=False, rope="real",
                                               seed=5),
}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_matches_reference(device, name, precision):
    case = ATTN_CASES[name].build("cpu")
    cache = case.new_cache("cpu")
    paged_write_ref(*case.write_args(cache), **case.write_kwargs(cache))
    ref = paged_attention_ref(*case.attn_args(cache), **case.attn_kwargs(cache))
    n_q = int(case.t["qsl"][-1])
    assert torch.isfinite(ref).all() and (ref[n_q:] == 0).all()
    num_splits, block_n = 3, 16
    dev_cache = alloc_paged_cache(case.spec, case.num_blocks, case.block_size, case.dtype, device)
    dev_cache.raw.copy_(cache.raw)
    case.to(device)
    got = paged_attention(*case.attn_args(dev_cache), **case.attn_kwargs(dev_cache), precision=precision,
                          num_splits=num_splits, block_n=block_n).cpu()
    case.to("cpu")
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got[n_q:] == 0).all()  # padding rows are never written
    bound = attention_bound(case, cache, ref, lowp=precision == "fp16", num_splits=num_splits, block_n=block_n)
    err = (got.double() - ref.double()).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max():.3g}, at bound {bound[err > bound].min():.3g}"


def test_attention_default_plan_and_bf16_output(device):
    """Default planning (splits chosen from the device) and a bf16 ``out`` buffer give the same result within
    the bound plus one bf16 rounding of the output."""
    case = ATTN_CASES["llama3-gqa4-sinks"].build("cpu")
    cache = case.new_cache("cpu")
    paged_write_ref(*case.write_args(cache), **case.write_kwargs(cache))
    ref = paged_attention_ref(*case.attn_args(cache), **case.attn_kwargs(cache))
    dev_cache = alloc_paged_cache(case.spec, case.num_blocks, case.block_size, case.dtype, device)
    dev_cache.raw.copy_(cache.raw)
    case.to(device)
    out = torch.full(case.t["query"].shape, float("nan"), dtype=torch.bfloat16, device=device)
    kw = dict(case.attn_kwargs(dev_cache), out_dtype=torch.bfloat16)
    got = paged_attention(*case.attn_args(dev_cache), **kw, precision="fp32", out=out).cpu()
    case.to("cpu")
    n_q = int(case.t["qsl"][-1])
    assert got.dtype == torch.bfloat16 and torch.isnan(got[n_q:].float()).all()  # padding rows untouched
    from rotkv_kernels.rotkv_paged_triton import plan_paged_attention

    plan = plan_paged_attention(case.t["qsl"], case.t["seq_lens"], spec=case.spec, num_query_heads=case.hq,
                                device=device)
    bound = attention_bound(case, cache, ref, lowp=False, num_splits=plan.num_splits, block_n=plan.block_n)
    bound = bound[:n_q] * (1 + 2**-8) + 2**-8 * ref[:n_q].double().abs()
    assert ((got[:n_q].double() - ref[:n_q].double()).abs() <= bound).all()


def test_large_cache_int64_offsets(device):
    """A cache of more than 2^31 bytes whose used blocks all lie past 2 GiB: both kernels must address them
    with 64-bit offsets (32-bit block * page products wrap). The CPU allocation is lazy (``torch.empty``):
    only the touched pages are committed."""
    case = PagedCase(_spec(2, 64, 2, 64, 64, 2, sinks=2), torch.bfloat16, 16, 6, ctx=[40, 7], q_lens=[1, 7],
                     hq=4, seed=7).build("cpu")
    sp = case.spec
    page = sp.page_bytes(case.block_size, case.dtype)
    n_big = (2**31) // page + 16
    assert n_big * page > 2**31
    try:
        big = alloc_paged_cache(sp, n_big, case.block_size, case.dtype, device)
    except (RuntimeError, MemoryError) as e:  # no lazy allocation here: say so rather than pass silently
        pytest.skip(f"cannot reserve {n_big * page / 2**30:.1f} GiB for the int64 test: {e}")
    small = case.new_cache("cpu")
    paged_write_ref(*case.write_args(small), **case.write_kwargs(small))
    ref = paged_attention_ref(*case.attn_args(small), **case.attn_kwargs(small))
    # the same blocks, renumbered past 2 GiB
    offset = n_big - case.num_blocks
    assert offset * page > 2**31
    used = case.t["tables"][case.t["tables"] >= 0].unique()
    for b in used.tolist():  # poison only the pages in use
        big.raw[(b + offset) * page:(b + offset + 1) * page].fill_(0xFF)
    case.t["tables"] = case.t["tables"] + offset
    case.t["slots"] = torch.where(case.t["slots"] >= 0, case.t["slots"] + offset * case.block_size, -1)
    case.to(device)
    paged_write(*case.write_args(big), **case.write_kwargs(big))
    for b in used.tolist():
        lo = (b + offset) * page
        assert torch.equal(big.raw[lo:lo + page].cpu(), small.raw[b * page:(b + 1) * page])
    got = paged_attention(*case.attn_args(big), **case.attn_kwargs(big), precision="fp32", num_splits=2).cpu()
    case.to("cpu")
    case.t["tables"] = case.t["tables"] - offset
    bound = attention_bound(case, small, ref, lowp=False, num_splits=2, block_n=16)
    assert ((got.double() - ref.double()).abs() <= bound).all()
    del big


def test_plan_covers_every_query_once_and_whole_context():
    from rotkv_kernels.rotkv_paged_triton import plan_paged_attention

    sp = _spec(8, 128, 8, 128, 128, 2, sinks=20)
    q_lens = [1, 1, 37, 5, 0, 64]
    seq = [1, 4097, 37, 305, 12, 100]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    for kw in (dict(), dict(num_splits=7), dict(tokens_per_block=3, block_n=32), dict(target_programs=1000)):
        plan = plan_paged_attention(qsl, torch.tensor(seq), spec=sp, num_query_heads=32, **kw)
        seen = {}
        for r, i0 in zip(plan.qb_req.tolist(), plan.qb_start.tolist()):
            for i in range(i0, min(i0 + plan.tokens_per_block, q_lens[r])):
                seen[(r, i)] = seen.get((r, i), 0) + 1
        assert seen == {(r, i): 1 for r in range(len(q_lens)) for i in range(q_lens[r])}
        assert plan.split_size % plan.block_n == 0 and plan.split_size >= sp.sink_tokens
        assert (plan.num_splits - 1) * plan.split_size < max(seq) <= plan.num_splits * plan.split_size
        assert plan.num_tokens == sum(q_lens)


def test_triton_limits_and_errors(device):
    from rotkv_kernels.rotkv_paged_triton import paged_attention_triton, plan_paged_attention

    case = ATTN_CASES["mha-3bit-fp8-postrope-vnorot"].build(device)
    cache = case.new_cache(device)
    args, kw = case.attn_args(cache), case.attn_kwargs(cache)
    with pytest.raises(ValueError, match="precision='bf16'"):
        paged_attention_triton(*args, **kw, precision="bf16")
    plan = plan_paged_attention(case.t["qsl"], case.t["seq_lens"], spec=case.spec, num_query_heads=case.hq)
    with pytest.raises(ValueError, match="either plan or planning arguments"):
        paged_attention_triton(*args, **kw, plan=plan, num_splits=2)
    with pytest.raises(ValueError, match="block_n=8"):
        plan_paged_attention(case.t["qsl"], case.t["seq_lens"], spec=case.spec, num_query_heads=2, block_n=8)
    odd = PagedCacheSpec(num_kv_heads=2, head_dim=48, key_group_size=48, value_group_size=48)
    c2 = alloc_paged_cache(odd, 2, 16, torch.float32, device)
    q = torch.zeros(1, 2, 48, device=device)
    one = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="head_dim=48: the Triton paged attention needs a power of two"):
        paged_attention_triton(q, c2.records, torch.zeros(1, 1, dtype=torch.int32, device=device), one,
                               torch.tensor([0, 1], dtype=torch.int32, device=device), spec=odd, scale=1.0)
    # the reference serves that layout
    assert paged_attention_ref(q.cpu(), c2.records.cpu(), torch.zeros(1, 1, dtype=torch.int32), one.cpu(),
                               torch.tensor([0, 1]), spec=odd, scale=1.0).shape == (1, 2, 48)


IMPORT_GUARD = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # import triton -> ImportError
    import torch
    from rotkv_kernels import rotkv_paged, rotkv_paged_triton as rpt
    assert not rpt.HAS_TRITON
    sp = rotkv_paged.PagedCacheSpec(num_kv_heads=1, head_dim=32, key_group_size=32, value_group_size=32)
    c = rotkv_paged.alloc_paged_cache(sp, 2, 16, torch.float32, fill=0)
    k = torch.randn(3, 1, 32)
    slots = torch.tensor([0, 5, 17])
    for call in (lambda: rpt.paged_write_triton(k, k, slots, c.records, spec=sp),
                 lambda: rpt.paged_attention_triton(k, c.records, None, None, None, spec=sp, scale=1.0),
                 lambda: rpt.paged_decode_triton(k, c.records, None, torch.ones(3, dtype=torch.int32), spec=sp,
                                                 scale=1.0)):
        try:
            call()
        except NotImplementedError as e:
            assert "needs Triton, which is not installed" in str(e), e
        else:
            raise AssertionError("stub did not raise")
    # the dispatch notices that Triton is missing (TRITON_INTERPRET=1 is set) and runs the reference
    c2 = rotkv_paged.alloc_paged_cache(sp, 2, 16, torch.float32, fill=0)
    rotkv_paged.paged_write(k, k, slots, c.records, spec=sp)
    rotkv_paged.paged_write_ref(k, k, slots, c2.records, spec=sp)
    assert torch.equal(c.raw, c2.raw)
    tab = torch.tensor([[0, 1]], dtype=torch.int32)
    args = (k[:1], c.records, tab, torch.tensor([18], dtype=torch.int32), torch.tensor([0, 1]))
    assert torch.equal(rotkv_paged.paged_attention(*args, spec=sp, scale=0.2),
                       rotkv_paged.paged_attention_ref(*args, spec=sp, scale=0.2))
    print("OK")
    """
)


def test_modules_import_and_stub_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", IMPORT_GUARD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
