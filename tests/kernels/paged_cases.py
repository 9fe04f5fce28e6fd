"""Shared builders for the paged-cache tests: a poisoned paged cache filled through a scattered slot mapping,
exact (quarter-turn) or real RoPE tables, and the derived error bound of the Triton attention.

Notation as in ``kernel_bounds``: ``u = 2^-24``, ``gamma_k = k u / (1 - k u)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernel_bounds import U32, UNIT_ROUNDOFF, decode_rotated, gamma, llama_cos_sin, ref_hadamard_terms
from rotkv_kernels.hadamard import hadamard_transform
from rotkv_kernels.rotkv_cache import rotate_half
from rotkv_kernels.rotkv_paged import PagedCacheSpec, _decode_context, alloc_paged_cache

POISON = 0xFF  # unwritten slots decode to NaN scales: any read of one shows up in the output


def quarter_turn_tables(n_pos: int, d: int, gen: torch.Generator, m: float = 1.0):
    """RoPE tables whose angles are multiples of pi/2 (``cos, sin`` in ``{0, +-m}``), HF layout ``[n_pos, d]``.

    With dyadic keys every RoPE product, sum and the division by ``m^2`` is exact in fp32, so the inverse
    RoPE of the write path is exact on every backend.
    """
    turns = torch.randint(0, 4, (n_pos, d // 2), generator=gen)
    c = torch.tensor([1.0, 0.0, -1.0, 0.0])[turns] * m
    s = torch.tensor([0.0, 1.0, 0.0, -1.0])[turns] * m
    return torch.cat([c, c], -1).contiguous(), torch.cat([s, s], -1).contiguous()


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF RoPE of ``k [T, H, D]`` with per-token ``cos/sin [T, D]``, fp32."""
    c, s = cos[:, None, :], sin[:, None, :]
    k = k.to(torch.float32)
    return k * c + rotate_half(k) * s


@dataclass
class PagedCase:
    """One layer's cache after writing every request's history, and one step of queries over it."""

    spec: PagedCacheSpec
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    ctx: list[int]  # cached tokens per request (the step's own tokens included)
    q_lens: list[int]
    hq: int
    dyadic: bool = True
    rope: str = "quarter"  # "quarter" (exact), "real" (Llama tables) or "none" (keys stored post-RoPE)
    rope_scale: float = 1.0
    perm: bool = True
    mean: bool = True
    seed: int = 0
    # filled by build()
    t: dict = field(default_factory=dict)

    def build(self, device="cpu") -> "PagedCase":
        gen = torch.Generator().manual_seed(self.seed)
        sp, h, d, w = self.spec, self.spec.num_kv_heads, self.spec.head_dim, self.spec.width
        n_pos = max(self.ctx) + 1
        if self.rope == "quarter":
            cos, sin = quarter_turn_tables(n_pos, d, gen, self.rope_scale)
        elif self.rope == "real":
            cos, sin = llama_cos_sin(torch.arange(n_pos), d)
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        else:
            cos = sin = None
        # Scattered physical blocks, one table row per request, padded with block 0.
        free = torch.randperm(self.num_blocks, generator=gen).tolist()
        nblk = [-(-c // self.block_size) for c in self.ctx]
        width = max(nblk) + 1
        tables = torch.zeros(len(self.ctx), width, dtype=torch.int32)
        for r, nb in enumerate(nblk):
            tables[r, :nb] = torch.tensor([free.pop() for _ in range(nb)])
        pos = torch.cat([torch.arange(c) for c in self.ctx])
        req = torch.cat([torch.full((c,), r) for r, c in enumerate(self.ctx)])
        slots = tables[req, pos // self.block_size].long() * self.block_size + pos % self.block_size
        n = pos.numel()
        if self.dyadic:  # k / 32 with |k| < 256: exact in bf16, and every rotation sum exact in fp32
            k_pre = torch.randint(-255, 256, (n, h, d), generator=gen).float() / 32
            v = torch.randint(-255, 256, (n, h, d), generator=gen).float() / 32
            mean = torch.randint(-64, 65, (w,), generator=gen).float() / 16
        else:
            k_pre = torch.randn(n, h, d, generator=gen) * torch.logspace(-0.5, 0.5, w).reshape(1, h, d)
            k_pre[:, :, 3] += 2.0  # an outlier channel, as real keys have
            v = torch.randn(n, h, d, generator=gen)
            mean = torch.randn(w, generator=gen) * 0.5
        k_post = k_pre if cos is None else apply_rope(k_pre, cos[pos], sin[pos])
        perm = None
        if self.perm:
            rw = sp.key_rot_width
            perm = torch.cat([torch.randperm(rw, generator=gen) + b * rw for b in range(w // rw)])
        # Two padding tokens with slot -1 (vLLM pads the token count), one in the middle.
        pad_at = n // 2
        k_in = torch.cat([k_post[:pad_at], k_post[:1] * 3, k_post[pad_at:], k_post[:1] * 5]).to(self.dtype)
        v_in = torch.cat([v[:pad_at], v[:1] * 3, v[pad_at:], v[:1] * 5]).to(self.dtype)
        slots_in = torch.cat([slots[:pad_at], torch.tensor([-1]), slots[pad_at:], torch.tensor([-1])])
        pos_in = torch.cat([pos[:pad_at], torch.tensor([0]), pos[pad_at:], torch.tensor([1])])
        qsl = torch.tensor([0] + torch.tensor(self.q_lens).cumsum(0).tolist(), dtype=torch.int32)
        n_q = int(qsl[-1])
        query = torch.randn(n_q + 2, self.hq, d, generator=gen).to(self.dtype)  # two padding rows at the end
        self.t = dict(
            tables=tables, cos=cos, sin=sin, slots=slots_in, positions=pos_in, key=k_in, value=v_in,
            perm=perm, mean=mean if self.mean else None, query=query, qsl=qsl,
            seq_lens=torch.tensor(self.ctx, dtype=torch.int32),
        )
        return self.to(device)

    def to(self, device) -> "PagedCase":
        self.t = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.t.items()}
        return self

    def new_cache(self, device="cpu"):
        return alloc_paged_cache(self.spec, self.num_blocks, self.block_size, self.dtype, device, fill=POISON)

    def write_kwargs(self, cache) -> dict:
        t = self.t
        return dict(spec=self.spec, positions=t["positions"], sinks=cache.sinks, rope_cos=t["cos"],
                    rope_sin=t["sin"], key_perm=t["perm"], key_mean=t["mean"])

    def write_args(self, cache) -> tuple:
        t = self.t
        return (t["key"], t["value"], t["slots"], cache.records)

    def attn_args(self, cache) -> tuple:
        t = self.t
        return (t["query"], cache.records, t["tables"], t["seq_lens"], t["qsl"])

    def attn_kwargs(self, cache) -> dict:
        t = self.t
        return dict(spec=self.spec, scale=self.spec.head_dim ** -0.5, sinks=cache.sinks, rope_cos=t["cos"],
                    rope_sin=t["sin"], key_perm=t["perm"], key_mean=t["mean"], out_dtype=torch.float32)


def attention_bound(case: PagedCase, cache, ref: torch.Tensor, *, lowp: bool, num_splits: int,
                    block_n: int, kernel_hadamard_terms=None) -> torch.Tensor:
    """Per-element bound on ``|paged_attention_triton - paged_attention_ref|`` (``[T, Hq, D]``, fp64, CPU).

    Both sides dequantize the same bytes identically (``(q - z) * s`` in fp32). They differ by:

    - **keys** (per head, L2): the inverse rotation's rounding on each side, ``sqrt(D) * gamma_K * ||y||_1 /
      sqrt(rw)`` with ``K`` the rounding steps of the reference's butterflies or the kernel's two dots
      (``y``: the dequantized rotation block); with fp16 products also the two fp16 casts (of ``y / sqrt(rw)``
      and of the intermediate product), each moving the result by ``u16 ||y||_2`` through maps that are
      orthogonal up to the normalization, plus the subnormal floor ``2^-25`` per element; then the mean add
      and RoPE (both sides, ``<= 8 u m (||k||_2 + ||mu||_2)``, ``m`` the tables' scale), times ``m``;
    - **scores** ``s = scale q.k``: ``|ds| <= scale (||q|| E_k + theta_qk ||q|| ||k||) + abs + 2^-20`` where
      ``theta_qk = 2u + 2 u16 + gamma_{D+1}`` (scaling of q, casts, fp32 sums of the two half dots), ``abs`` the
      fp16 subnormal floor and ``2^-20`` the hardware ``exp2`` (relative error below ``2^-21``);
    - **softmax**: weights ``p'_j = p_j e^{d_j} / sum_k p_k e^{d_k}`` with ``|d_j| <= eps`` move by at most
      ``(e^{2 eps} - 1) p_j``, so the output moves by ``(e^{2 eps} - 1) max_j |v_j|``;
    - **p V** in V's rotated basis then one inverse Hadamard: the fp32 sums over the context, the online
      rescales and the split merge (``gamma_{L + 2 tiles + 2 splits + 8}``), the fp16 casts of ``p`` and ``v``,
      and the final rotation's rounding, all relative to ``max_j ||v_rot_j||_1 / sqrt(rw_v)`` (the bound of
      an orthonormal map's output element by the input's L1 norm); the normalization ``l``'s rounding
      moves the output by ``gamma max |v|``; the reference's own inverse value rotation (butterflies) adds its
      Hadamard bound; sink values are rotated forward in fp32 by the kernel (same form);
    - **output**: one rounding to fp32 on each side.

    ``kernel_hadamard_terms(n)`` gives the rounding steps of the kernel's order-``n`` Hadamard (default: the
    Triton kernels' two padded dots, ``triton_hadamard_terms``); the C++ CPU kernels pass their own count.
    """
    sp = case.spec
    h, d, w = sp.num_kv_heads, sp.head_dim, sp.width
    from rotkv_kernels.hadamard_triton import hadamard_plan

    kp = hadamard_plan(sp.key_rot_width)
    if kernel_hadamard_terms is None:
        def kernel_hadamard_terms(n: int) -> int:
            plan = hadamard_plan(n)
            return plan.a_pad + plan.b_pad + 1
    u16 = UNIT_ROUNDOFF[torch.float16] if lowp else 0.0
    sub16 = 2.0**-25 if lowp else 0.0
    t = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.t.items()}
    records = cache.records.cpu() if cache.records.device.type != "cpu" else cache.records
    sinks = None if cache.sinks is None else cache.sinks.cpu()
    q_all = t["query"].double()
    out = torch.zeros_like(ref, dtype=torch.float64)
    rpd = case.hq // h
    m_rope = 1.0 if t["cos"] is None else float((t["cos"] ** 2 + t["sin"] ** 2).sqrt().max())
    rw, rwv = sp.key_rot_width, sp.value_rot_width
    qsl = t["qsl"].tolist()
    for r, length in enumerate(case.ctx):
        q_lo, q_hi = qsl[r], qsl[r + 1]
        if q_hi == q_lo:
            continue
        tab = t["tables"][r]
        pos = torch.arange(length)
        rec = records[tab[pos // case.block_size].long(), pos % case.block_size]
        yk, _, _ = decode_rotated(rec[:, : sp.key_bytes], w, sp.key_bits, sp.key_group_size, sp.scale_format)
        yv, _, _ = decode_rotated(rec[:, sp.key_bytes: sp.key_bytes + sp.value_bytes], w, sp.value_bits,
                                  sp.value_group_size, sp.scale_format)
        k_ref, v_ref = _decode_context(sp, records, sinks, tab, length, t["cos"], t["sin"], t["perm"], t["mean"])
        k_ref, v_ref = k_ref.double(), v_ref.double()
        n_sink = min(sp.sink_tokens, length)
        # per key and KV head
        yb = yk.double().reshape(length, w // rw, rw)
        y1 = yb.abs().sum(-1).repeat_interleave(rw // d, dim=1)  # [L, H]: L1 of the head's rotation block
        y2 = yb.norm(dim=-1).repeat_interleave(rw // d, dim=1)
        e_had = (math.sqrt(d) * (gamma(ref_hadamard_terms(rw)) + gamma(kernel_hadamard_terms(rw))) * y1
                 / math.sqrt(rw))
        e_had = e_had + 2.01 * u16 * y2 + 2 * sub16 * (kp.a_pad * kp.b_pad) * math.sqrt(d)
        mu = torch.zeros(h) if t["mean"] is None else t["mean"].double().reshape(h, d).norm(dim=-1)
        k_norm = k_ref.norm(dim=-1)  # [L, H] post-RoPE
        e_k = m_rope * e_had + 8 * U32 * m_rope * (k_norm / max(m_rope, 1e-30) + mu)
        e_k[:n_sink] = 0.0  # both sides use the stored full-precision sink keys
        k1 = k_ref.abs().sum(-1)
        # values: rotated-basis L1 per head block (rw_v = D or 1), sinks rotated forward by the kernel
        vr = yv.double().reshape(length, h, d)
        if n_sink:
            vs = v_ref[:n_sink]
            vr[:n_sink] = hadamard_transform(vs.float(), block_size=rwv).double() if rwv > 1 else vs
        v1 = vr.abs().reshape(length, w // rwv, rwv).sum(-1).reshape(length, h, d // rwv).amax(-1) / math.sqrt(rwv)
        vinf = v_ref.abs().amax(-1)
        vrinf = vr.abs().amax(-1)
        tiles = -(-length // block_n) + 1
        g_acc = gamma(length + 2 * tiles + 2 * num_splits + 8)
        g_v = gamma(ref_hadamard_terms(rwv)) + (gamma(kernel_hadamard_terms(rwv)) if rwv > 1 else 0.0)
        for i in range(q_lo, q_hi):
            q = q_all[i]  # [Hq, D]
            qn = q.norm(dim=-1)
            q1 = q.abs().sum(-1)
            for hh in range(case.hq):
                kh = hh // rpd
                scale = case.spec.head_dim ** -0.5
                theta_qk = 2 * U32 + 2 * u16 + gamma(d + 1)
                eps = scale * (qn[hh] * e_k[:, kh].max() + theta_qk * qn[hh] * k_norm[:, kh].max())
                eps += sub16 * (k1[:, kh].max() + scale * math.log2(math.e) * q1[hh]) + 2.0**-20
                vmax = vinf[:, kh].max()
                b = (math.expm1(2 * float(eps)) + g_acc) * vmax
                b += (2 * u16 + g_acc + g_v) * v1[:, kh].max()
                b += sub16 * (length + 1) * math.sqrt(rwv) * (vrinf[:, kh].max() + 1)
                out[i, hh] = b
    # one rounding of each output to fp32 (relative u on both sides) and the subnormal floor
    return out + 2 * U32 * (ref.double().abs() + out) + 2.0**-140
