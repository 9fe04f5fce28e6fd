"""C++ CPU kernels of the RotateKV paged cache (``rotkv_kernels.rotkv_paged_cpu``) against the references of
``rotkv_paged``.

- Writes are compared byte for byte over the whole cache (every page, the untouched bytes included). With
  dyadic inputs and quarter-turn RoPE tables every rotation sum is exact, so the records must be identical;
  with Gaussian keys and real RoPE tables at a power-of-two rotation width the C++ write performs the
  reference's fp32 operations in the reference's order, so the bytes must still be identical.
- Attention is compared with ``paged_attention_ref`` within ``paged_cases.attention_bound`` (derived there),
  with this kernel's Hadamard rounding count (:func:`cpu_hadamard_terms`), for every ISA this CPU runs
  (AVX-512, AVX2 and the scalar reference), on mixed batches: decodes with odd context lengths, prefill
  chunks over earlier chunks (causal inside the chunk), new prefills, many sequences of different lengths;
  GQA ratios 1/3/4/8, head sizes 64/128/256, 2/3/4 bits, fp16 and fp8 scales, sinks on and off, block sizes
  that hold whole tiles (pages read in place) and odd ones (tiles copied), scattered blocks, split-K.
- One cache is larger than 2^31 bytes with every used block past 2 GiB (64-bit offsets).
- ``torch.library.opcheck`` on both ops; errors name the bad argument; the package imports and says how to
  build the kernels when the extension is missing.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernel_bounds import ref_hadamard_terms
from paged_cases import PagedCase, attention_bound
from rotkv_kernels import rotkv_paged_cpu as cpu
from rotkv_kernels.rotkv_paged import PagedCacheSpec, alloc_paged_cache, paged_attention_ref, paged_write_ref

if not cpu.cpu_kernels_available():
    pytest.skip(cpu.cpu_kernels_status(), allow_module_level=True)

ISAS = [name for name in ("avx512", "avx2", "scalar")
        if name == "scalar" or cpu.cpu_isa("auto") == name or (name == "avx2" and cpu.cpu_isa("auto") == "avx512")]


def cpu_hadamard_terms(n: int) -> int:
    """Rounding steps on one output of the kernel's inverse Hadamard: the dequantization with the scale
    pre-multiplied by ``1/sqrt(n)`` (two roundings, where the reference has one multiply at the end), the
    ``log2(p)`` butterfly stages and the core's ``m``-term sum (two half sums and their addition)."""
    return ref_hadamard_terms(n) + 1


def _spec(h, d, g, gs, vgs, bits, fmt="fp16", sinks=0, vrot=True, pad=0):
    sp = PagedCacheSpec(num_kv_heads=h, head_dim=d, key_bits=bits, value_bits=bits, key_group_size=gs,
                        value_group_size=vgs, key_rot_width=g * d, value_rot_width=d if vrot else 1,
                        key_clip=0.8 if bits == 2 else 1.0, value_clip=0.8 if bits == 2 else 1.0, scale_format=fmt,
                        sink_tokens=sinks)
    if pad:
        sp = PagedCacheSpec.from_dict(dict(sp.to_dict(), record_bytes=sp.record_bytes + pad))
    return sp


# ---- write ------------------------------------------------------------------------------------------------

WRITE_CASES = {
    "llama3-2bit-fp8-sinks": PagedCase(_spec(8, 128, 8, 64, 128, 2, "fp8", sinks=4), torch.bfloat16, 16, 9,
                                       ctx=[37, 1, 21], q_lens=[1, 1, 5], hq=32),
    "smollm-paley192-3bit-fp8-bs7": PagedCase(_spec(3, 64, 3, 64, 192, 3, "fp8", sinks=2), torch.float32, 7, 14,
                                              ctx=[23, 30], q_lens=[1, 4], hq=9, rope_scale=2.0, mean=False),
    "4bit-fp16-postrope-vnorot-padded": PagedCase(_spec(2, 32, 1, 32, 16, 4, vrot=False, pad=6), torch.float16, 16,
                                                  6, ctx=[19, 33], q_lens=[2, 1], hq=2, rope="none"),
    "d256-2bit-fp16-sink": PagedCase(_spec(1, 256, 1, 128, 64, 2, sinks=1), torch.bfloat16, 16, 6, ctx=[35, 12],
                                     q_lens=[1, 2], hq=4),
    # Gaussian keys, real RoPE, power-of-two width: the same fp32 operations in the same order -> same bytes
    "gaussian-real-rope-pow2": PagedCase(_spec(8, 128, 8, 128, 128, 2), torch.float32, 16, 8, ctx=[45, 30],
                                         q_lens=[1, 1], hq=32, dyadic=False, rope="real", seed=3),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(WRITE_CASES))
def test_write_bit_exact_whole_cache(name, isa):
    case = WRITE_CASES[name].build("cpu")
    ref, got = case.new_cache(), case.new_cache()
    paged_write_ref(*case.write_args(ref), **case.write_kwargs(ref))
    cpu.paged_write_cpu(*case.write_args(got), **case.write_kwargs(got), isa=isa)
    assert torch.equal(got.raw, ref.raw), f"{(got.raw != ref.raw).sum().item()} bytes differ"
    # not vacuous: every written slot changed, padding tokens (slot -1) left no trace beyond the reference's
    slots = case.t["slots"][case.t["slots"] >= 0]
    bs = case.block_size
    recs = ref.records[slots // bs, slots % bs, : case.spec.key_bytes + case.spec.value_bytes]
    assert (recs != 0xFF).any(dim=1).all()


# Gaussian keys through a Paley core (order 12: SmolLM2's 3 heads of 64 rotated together) and real RoPE: the
# reference's core is a matmul whose fp32 summation order is torch's, so its bytes need not be the kernels';
# every vector kernel must still give the scalar kernel's bytes (the same fp32 operations per value, lanes over
# tokens), with partial tiles and padding tokens, and those bytes must be the reference's up to the few codes
# that sit on a rounding boundary.
PALEY_CASES = {
    "paley192-2bit-fp8": PagedCase(_spec(3, 64, 3, 64, 192, 2, "fp8", sinks=1), torch.bfloat16, 16, 12,
                                   ctx=[37, 1, 21], q_lens=[1, 1, 5], hq=9, dyadic=False, rope="real", seed=7),
    "paley192-3bit-fp16-bs7": PagedCase(_spec(3, 64, 3, 32, 64, 3, sinks=2), torch.float32, 7, 20,
                                        ctx=[23, 30, 2], q_lens=[1, 4, 2], hq=9, dyadic=False, rope="real", seed=8),
}


@pytest.mark.parametrize("name", list(PALEY_CASES))
def test_write_vector_kernels_match_scalar_kernel(name):
    case = PALEY_CASES[name].build("cpu")
    caches = {}
    for isa in ISAS:
        caches[isa] = case.new_cache()
        cpu.paged_write_cpu(*case.write_args(caches[isa]), **case.write_kwargs(caches[isa]), isa=isa)
    for isa in ISAS:
        n_diff = (caches[isa].raw != caches["scalar"].raw).sum().item()
        assert n_diff == 0, f"{isa}: {n_diff} bytes differ from the scalar kernel's"
    ref = case.new_cache()
    paged_write_ref(*case.write_args(ref), **case.write_kwargs(ref))
    slots = case.t["slots"][case.t["slots"] >= 0]
    bs, sp = case.block_size, case.spec
    got = caches["scalar"].records[slots // bs, slots % bs, : sp.key_bytes + sp.value_bytes]
    want = ref.records[slots // bs, slots % bs, : sp.key_bytes + sp.value_bytes]
    differ = (got != want).float().mean().item()
    assert differ < 0.01, f"{differ:.2%} of the record bytes differ from the reference's"
    as_bytes = lambda x: x.contiguous().view(torch.uint8)  # noqa: E731 (the unwritten bytes are NaN poison)
    assert torch.equal(as_bytes(caches["scalar"].sinks), as_bytes(ref.sinks))


# ---- attention --------------------------------------------------------------------------------------------

ATTN_CASES = {
    # Llama-3-8B heads: GQA 4, 8 KV heads rotated together (1024), fp8 scales, sinks, decodes + prefill chunks
    "llama3-gqa4-d128-2bit-fp8-sinks": PagedCase(_spec(8, 128, 8, 64, 128, 2, "fp8", sinks=4), torch.bfloat16, 16,
                                                 48, ctx=[37, 1, 21, 19, 200], q_lens=[1, 1, 5, 19, 1], hq=32,
                                                 dyadic=False, rope="real"),
    # SmolLM2 heads: GQA 3, Paley order 192 = 12 * 16, a value group spanning the three heads
    "smollm-gqa3-d64-paley192": PagedCase(_spec(3, 64, 3, 64, 192, 2, "fp8", sinks=1), torch.bfloat16, 16, 30,
                                          ctx=[29, 133, 64, 17], q_lens=[1, 3, 1, 17], hq=9, dyadic=False,
                                          rope="real", seed=1),
    # MHA (GQA 1), 3 bits, fp16 scales, no sinks, keys stored post-RoPE, values unrotated, groups of 32
    "mha-d64-3bit-postrope-vnorot": PagedCase(_spec(2, 64, 1, 32, 32, 3, vrot=False), torch.float16, 16, 12,
                                              ctx=[41, 17, 3], q_lens=[1, 17, 2], hq=2, dyadic=False, rope="none",
                                              seed=2),
    # GQA 8, head 256, 4 bits, odd block size (tiles copied), fp32 sinks
    "gqa8-d256-4bit-bs7-sinks": PagedCase(_spec(2, 256, 1, 128, 64, 4, sinks=2), torch.float32, 7, 30,
                                          ctx=[50, 26, 3], q_lens=[1, 6, 3], hq=16, dyadic=False, rope="real",
                                          seed=4),
    # GQA 3, 3 bits, 4 heads of 128 in two rotation blocks of 256, sinks, block 32
    "gqa3-d128-3bit-two-rotation-blocks": PagedCase(_spec(4, 128, 2, 128, 128, 3, "fp8", sinks=3), torch.bfloat16,
                                                    32, 20, ctx=[70, 5, 40], q_lens=[1, 5, 8], hq=12, dyadic=False,
                                                    rope="real", seed=5),
    # many sequences of different lengths in one decode batch
    "many-sequences-decode": PagedCase(_spec(2, 64, 2, 64, 128, 2, "fp8", sinks=1), torch.bfloat16, 16, 260,
                                       ctx=[1, 2, 15, 16, 17, 31, 33, 64, 65, 100, 127, 128, 129, 150, 7, 90,
                                            45, 3, 111, 77, 58, 140, 9, 20],
                                       q_lens=[1] * 24, hq=8, dyadic=False, rope="real", seed=6),
}


@functools.lru_cache(maxsize=None)
def _prepared(name):
    case = ATTN_CASES[name].build("cpu")
    cache = case.new_cache()
    paged_write_ref(*case.write_args(cache), **case.write_kwargs(cache))
    ref = paged_attention_ref(*case.attn_args(cache), **case.attn_kwargs(cache))
    n_q = int(case.t["qsl"][-1])
    assert torch.isfinite(ref).all() and (ref[n_q:] == 0).all()
    # block_n=1 and 64 splits: the bound's counts of tiles and splits cover any plan of the kernel
    bound = attention_bound(case, cache, ref, lowp=False, num_splits=64, block_n=1,
                            kernel_hadamard_terms=cpu_hadamard_terms)
    return case, cache, ref, bound


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_matches_reference(name, isa, num_splits):
    case, cache, ref, bound = _prepared(name)
    got = cpu.paged_attention_cpu(*case.attn_args(cache), **case.attn_kwargs(cache), isa=isa, num_splits=num_splits)
    n_q = int(case.t["qsl"][-1])
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got[n_q:] == 0).all()  # padding rows are never written
    err = (got.double() - ref.double()).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max():.3g}, at bound {bound[err > bound].min():.3g}"


# Decodes long enough for the default plan to split the context (up to 16 items per thread, at least 256
# positions per split before rounding): one sequence alone gets several splits, sinks in split 0.
LONG_DECODES = PagedCase(_spec(3, 64, 3, 64, 192, 2, "fp8", sinks=1), torch.bfloat16, 16, 48,
                         ctx=[300, 257, 40], q_lens=[1] * 3, hq=9, dyadic=False, rope="real", seed=8)


@functools.lru_cache(maxsize=None)
def _prepared_long():
    case = LONG_DECODES.build("cpu")
    cache = case.new_cache()
    # the C++ write (faster than the reference here; the bound is computed from the bytes it wrote)
    cpu.paged_write_cpu(*case.write_args(cache), **case.write_kwargs(cache))
    ref = paged_attention_ref(*case.attn_args(cache), **case.attn_kwargs(cache))
    bound = attention_bound(case, cache, ref, lowp=False, num_splits=64, block_n=1,
                            kernel_hadamard_terms=cpu_hadamard_terms)
    return case, cache, ref, bound


@pytest.mark.parametrize("isa", ISAS)
def test_default_splits_long_decodes(isa):
    """The default plan (context splits sized from the thread count, merged by the last item of each row)
    on one and on several sequences, against the reference."""
    case, cache, ref, bound = _prepared_long()
    args, kw = case.attn_args(cache), case.attn_kwargs(cache)
    got = cpu.paged_attention_cpu(*args, **kw, isa=isa)
    assert ((got.double() - ref.double()).abs() <= bound).all()
    # one sequence alone (the batch-1 decode plan: its context split over the threads)
    t = case.t
    one = cpu.paged_attention_cpu(t["query"][:1], cache.records, t["tables"][:1], t["seq_lens"][:1], t["qsl"][:2],
                                  **kw, isa=isa)
    assert ((one.double() - ref[:1].double()).abs() <= bound[:1]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_rope_tables_with_different_halves(isa):
    """Tables whose two halves differ (not Hugging Face's [c | c]) take the kernel's full-width RoPE path."""
    case = ATTN_CASES["gqa3-d128-3bit-two-rotation-blocks"].build("cpu")
    d = case.spec.head_dim
    gen = torch.Generator().manual_seed(11)
    for name in ("cos", "sin"):
        t = case.t[name].clone()
        t[:, d // 2:] *= 1.0 + 0.25 * torch.rand(t.shape[0], d // 2, generator=gen)
        case.t[name] = t
    cache = case.new_cache()
    paged_write_ref(*case.write_args(cache), **case.write_kwargs(cache))
    ref = paged_attention_ref(*case.attn_args(cache), **case.attn_kwargs(cache))
    bound = attention_bound(case, cache, ref, lowp=False, num_splits=64, block_n=1,
                            kernel_hadamard_terms=cpu_hadamard_terms)
    got = cpu.paged_attention_cpu(*case.attn_args(cache), **case.attn_kwargs(cache), isa=isa)
    assert ((got.double() - ref.double()).abs() <= bound).all()


def test_bf16_out_buffer_and_padding_rows_untouched():
    case, cache, ref, bound = _prepared("llama3-gqa4-d128-2bit-fp8-sinks")
    out = torch.full(case.t["query"].shape, float("nan"), dtype=torch.bfloat16)
    kw = dict(case.attn_kwargs(cache), out_dtype=torch.bfloat16)
    got = cpu.paged_attention_cpu(*case.attn_args(cache), **kw, out=out)
    n_q = int(case.t["qsl"][-1])
    assert got is out and torch.isnan(got[n_q:].float()).all()
    b = bound[:n_q] * (1 + 2**-8) + 2**-8 * ref[:n_q].double().abs()  # one bf16 rounding of the output
    assert ((got[:n_q].double() - ref[:n_q].double()).abs() <= b).all()


def test_decode_wrapper_and_isa_env(monkeypatch):
    case, cache, ref, bound = _prepared("many-sequences-decode")
    monkeypatch.setenv(cpu.ISA_ENV, "scalar")
    assert cpu.cpu_isa() == "scalar"
    kw = case.attn_kwargs(cache)
    got = cpu.paged_decode_cpu(case.t["query"][:24], cache.records, case.t["tables"], case.t["seq_lens"], **kw)
    assert ((got.double() - ref[:24].double()).abs() <= bound[:24]).all()


def test_large_cache_int64_offsets():
    """A cache of more than 2^31 bytes whose used blocks all lie past 2 GiB: write and attention must address
    them with 64-bit offsets. The allocation is lazy (``torch.empty``): only the touched pages are committed."""
    case = PagedCase(_spec(2, 64, 2, 64, 64, 2, "fp8", sinks=2), torch.bfloat16, 16, 6, ctx=[40, 7], q_lens=[1, 7],
                     hq=4, seed=7).build("cpu")
    sp = case.spec
    page = sp.page_bytes(case.block_size, case.dtype)
    n_big = (2**31) // page + 16
    big = alloc_paged_cache(sp, n_big, case.block_size, case.dtype)
    small = case.new_cache()
    paged_write_ref(*case.write_args(small), **case.write_kwargs(small))
    ref = paged_attention_ref(*case.attn_args(small), **case.attn_kwargs(small))
    offset = n_big - case.num_blocks
    assert offset * page > 2**31
    used = case.t["tables"].unique()
    for b in used.tolist():
        big.raw[(b + offset) * page:(b + offset + 1) * page].fill_(0xFF)
    case.t["tables"] = case.t["tables"] + offset
    case.t["slots"] = torch.where(case.t["slots"] >= 0, case.t["slots"] + offset * case.block_size, -1)
    cpu.paged_write_cpu(*case.write_args(big), **case.write_kwargs(big))
    for b in used.tolist():
        lo = (b + offset) * page
        assert torch.equal(big.raw[lo:lo + page], small.raw[b * page:(b + 1) * page])
    got = cpu.paged_attention_cpu(*case.attn_args(big), **case.attn_kwargs(big), num_splits=2)
    case.t["tables"] = case.t["tables"] - offset
    bound = attention_bound(case, small, ref, lowp=False, num_splits=2, block_n=1,
                            kernel_hadamard_terms=cpu_hadamard_terms)
    assert ((got.double() - ref.double()).abs() <= bound).all()
    del big


def test_opcheck_both_ops():
    case, cache, ref, bound = _prepared("smollm-gqa3-d64-paley192")
    sp = case.spec
    t = case.t
    out = torch.zeros(t["query"].shape, dtype=torch.float32)
    args = (t["query"], cache.records, t["tables"], t["seq_lens"], t["qsl"], cache.sinks, t["cos"], t["sin"],
            t["perm"], t["mean"], cpu._core(sp.key_rot_width), cpu._value_core(sp), cpu._layout(sp),
            sp.head_dim ** -0.5, 0, 0, out)
    torch.library.opcheck(torch.ops.rotkv.paged_attention_cpu.default, args)
    wcase = WRITE_CASES["4bit-fp16-postrope-vnorot-padded"].build("cpu")  # no sinks: records is the only output
    wc = wcase.new_cache()
    ws = wcase.spec
    wt = wcase.t
    wargs = (wt["key"], wt["value"], wt["slots"], wc.records, wt["positions"], None, None, None, wt["perm"],
             wt["mean"], cpu._core(ws.key_rot_width), cpu._value_core(ws), cpu._layout(ws), float(ws.key_clip),
             float(ws.value_clip))
    torch.library.opcheck(torch.ops.rotkv.paged_write_cpu.default, wargs)


def test_limits_and_errors():
    case, cache, ref, bound = _prepared("mha-d64-3bit-postrope-vnorot")
    args, kw = case.attn_args(cache), case.attn_kwargs(cache)
    with pytest.raises(ValueError, match="isa='avx9'"):
        cpu.paged_attention_cpu(*args, **kw, isa="avx9")
    with pytest.raises(ValueError, match="num_splits=0"):
        cpu.paged_attention_cpu(*args, **kw, num_splits=0)
    with pytest.raises(ValueError, match="out: expected"):
        cpu.paged_attention_cpu(*args, **kw, out=torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="scale="):  # the reference's argument checks run first
        cpu.paged_attention_cpu(*args, **dict(kw, scale=-1.0))
    # a Hadamard core above the kernel's order limit is named (1216 = 76 * 16, a Paley II core of order 76)
    with pytest.raises(ValueError, match="order 1216 = 76 \\* 16"):
        cpu._core(1216)
    odd = PagedCacheSpec(num_kv_heads=2, head_dim=40, key_group_size=40, value_group_size=40)
    c2 = alloc_paged_cache(odd, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim=40: the CPU kernels need a multiple of 16"):
        cpu.paged_attention_cpu(torch.zeros(1, 2, 40), c2.records, torch.zeros(1, 1, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), torch.tensor([0, 1]), spec=odd, scale=1.0)


def test_layer_kernels_match_the_checked_functions_and_check_their_constants():
    """``CpuLayerKernels`` (the backend's per-layer entry) writes the same bytes and attends to the same output as
    the checked functions; its constants are refused with the checked functions' errors when it is made, and the
    ops themselves refuse a step's slot or position outside the cache or the RoPE tables (no write out of bounds)."""
    case = WRITE_CASES["llama3-2bit-fp8-sinks"].build("cpu")
    ref, got = case.new_cache(), case.new_cache()
    t, sp = case.t, case.spec
    cpu.paged_write_cpu(*case.write_args(ref), **case.write_kwargs(ref))
    ops = cpu.CpuLayerKernels(sp, scale=sp.head_dim ** -0.5, rope_cos=t["cos"], rope_sin=t["sin"], key_perm=t["perm"],
                              key_mean=t["mean"])
    ops.write(t["key"], t["value"], t["slots"], t["positions"], got.records, got.sinks)
    assert torch.equal(got.raw, ref.raw)

    acase, cache, want, bound = _prepared("smollm-gqa3-d64-paley192")
    at, asp = acase.t, acase.spec
    aops = cpu.CpuLayerKernels(asp, scale=asp.head_dim ** -0.5, rope_cos=at["cos"], rope_sin=at["sin"],
                               key_perm=at["perm"], key_mean=at["mean"])
    out = torch.zeros(at["query"].shape, dtype=torch.float32)
    aops.attend(at["query"], cache.records, at["tables"], at["seq_lens"], at["qsl"], cache.sinks, out)
    assert torch.equal(out, cpu.paged_attention_cpu(*acase.attn_args(cache), **acase.attn_kwargs(cache)))
    assert ((out.double() - want.double()).abs() <= bound).all()

    with pytest.raises(ValueError, match="scale="):
        cpu.CpuLayerKernels(sp, scale=0.0)
    with pytest.raises(ValueError, match="rope_cos and rope_sin"):
        cpu.CpuLayerKernels(sp, scale=1.0, rope_cos=t["cos"])
    dup = t["perm"].clone()
    dup[0] = dup[1]  # not a permutation
    with pytest.raises(ValueError, match="perm"):
        cpu.CpuLayerKernels(sp, scale=1.0, key_perm=dup)
    with pytest.raises(ValueError, match="key_mean"):
        cpu.CpuLayerKernels(sp, scale=1.0, key_mean=torch.zeros(3))
    n_slots = got.records.shape[0] * got.records.shape[1]
    before = got.raw.clone()
    with pytest.raises(RuntimeError, match="past the cache"):
        ops.write(t["key"], t["value"], torch.full_like(t["slots"], n_slots), t["positions"], got.records, got.sinks)
    with pytest.raises(RuntimeError, match="RoPE tables have"):
        ops.write(t["key"], t["value"], t["slots"], torch.full_like(t["positions"], t["cos"].shape[0]), got.records,
                  got.sinks)
    assert torch.equal(got.raw, before)  # refused before any byte was written


def test_key_order_checked_again_after_an_edit():
    """The entry points check a key order's values once (then only its dtype and shape): an in-place edit
    bumps the tensor's version, so a broken order is still refused; a fresh tensor is checked too."""
    case, cache, ref, bound = _prepared("smollm-gqa3-d64-paley192")
    args, kw = case.attn_args(cache), case.attn_kwargs(cache)
    perm = kw["key_perm"].clone()
    kw = dict(kw, key_perm=perm)
    got = cpu.paged_attention_cpu(*args, **kw)
    assert ((got.double() - ref.double()).abs() <= bound).all()
    cpu.paged_attention_cpu(*args, **kw)  # checked before: the fast path
    perm[0] = perm[1]
    with pytest.raises(ValueError, match="not a permutation"):
        cpu.paged_attention_cpu(*args, **kw)
    with pytest.raises(ValueError, match="not a permutation"):
        cpu.paged_write_cpu(*case.write_args(cache), **dict(case.write_kwargs(cache), key_perm=perm))
    with pytest.raises(ValueError, match="perm: expected an int64"):
        cpu.paged_attention_cpu(*args, **dict(kw, key_perm=kw["key_perm"][:-1]))


NOT_BUILT = textwrap.dedent(
    """
    import importlib.util
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "rotkv_kernels._paged_cpu" else real(name, *a)
    import torch
    from rotkv_kernels import rotkv_paged, rotkv_paged_cpu as rpc
    assert not rpc.cpu_kernels_available()
    assert "setup.py build_ext" in rpc.cpu_kernels_status(), rpc.cpu_kernels_status()
    sp = rotkv_paged.PagedCacheSpec(num_kv_heads=1, head_dim=32, key_group_size=32, value_group_size=32)
    c = rotkv_paged.alloc_paged_cache(sp, 2, 16, torch.float32, fill=0)
    k = torch.randn(3, 1, 32)
    try:
        rpc.paged_write_cpu(k, k, torch.tensor([0, 5, 17]), c.records, spec=sp)
    except NotImplementedError as e:
        assert "not built" in str(e) and "setup.py build_ext" in str(e), e
    else:
        raise AssertionError("no error without the extension")
    print("OK")
    """
)


def test_imports_and_names_the_build_command_without_the_extension():
    out = subprocess.run([sys.executable, "-c", NOT_BUILT], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
