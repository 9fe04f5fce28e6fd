"""The vLLM backend's fused (Triton) path against its PyTorch path, driven step by step like the engine drives it.

Two backends share every input: one built with ``ROTKV_ATTENTION_IMPL=torch``, one with ``=triton`` (the
kernels run in Triton's interpreter on the CPU, ``TRITON_INTERPRET=1``; skipped otherwise). Each owns a cache
laid out as vLLM lays out a padded page, poisoned (0xFF) where unwritten, with scattered block tables; steps
mix prefill chunks, decodes, new requests and padding tokens.

- **Writes.** With inputs whose Hadamard sums are exact in fp32 (dyadic K/V and key means, quarter-turn RoPE
  tables), both paths must leave the two caches byte for byte identical, sink areas and untouched bytes
  included (``rotkv_paged_triton`` documents its records as ``rotkv_write_ref``'s bytes in that case; with
  Gaussian inputs a code may differ where ``y / s`` sits on a rounding boundary, which the kernel tests bound).
- **Attention.** Both paths then read identical records, so outputs differ by floating-point arithmetic only:
  the order of the fp32 sums (and, at ``precision="fp16"``, the kernel's fp16 products) and one bf16 rounding
  of each output. Both are bounded against the float64 ``paged_attention_ref`` over the same cache: the fused
  path by ``paged_cases.attention_bound`` (derived term by term there) plus one bf16 rounding, the PyTorch
  path by one bf16 rounding of outputs of magnitude ``<= max|ref|`` (``2^-8 max|ref|``) plus ``1e-5`` for
  its fp32 arithmetic (as in ``test_vllm_backend.py``). The two outputs must differ by at most the sum.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from rotkv_kernels.rotkv_paged import alloc_paged_cache, paged_attention_ref  # noqa: E402
from rotkv_kernels.rotkv_cache import rotate_half  # noqa: E402
from rotkv_vllm import vllm_backend as vb  # noqa: E402
from rotkv_vllm.calibration import RotateKVCalibration  # noqa: E402
from rotkv_vllm.config import RotateKVConfig  # noqa: E402

# The fused path's error bound is derived once, next to the kernel tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_bounds import llama_cos_sin  # noqa: E402
from paged_cases import attention_bound, quarter_turn_tables  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16_U = 2.0**-8  # unit roundoff of bf16 (half an ulp, relative)


@pytest.fixture(autouse=True)
def _no_runtime_leak():
    yield
    vb.install_runtime(None)


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    from rotkv_kernels.hadamard_triton import is_interpreted

    if not is_interpreted():
        pytest.skip("the fused path runs on the CPU only in Triton's interpreter: set TRITON_INTERPRET=1")


def _runtime(cfg: RotateKVConfig, *, layers=2, kv_heads=2, d=64, g=2, exact=True, seed=0):
    """A runtime with random block-preserving key orders, key means (dyadic when ``exact``) and RoPE tables
    (quarter turns when ``exact``: every product exact in fp32; else Llama's)."""
    gen = torch.Generator().manual_seed(seed)
    w = kv_heads * d
    orders = [torch.cat([torch.randperm(g * d, generator=gen) + j * g * d for j in range(kv_heads // g)])
              for _ in range(layers)]
    if exact:
        means = [torch.randint(-64, 65, (w,), generator=gen).float() / 16 for _ in range(layers)]
        rope = quarter_turn_tables(512, d, gen)
    else:
        means = [torch.randn(w, generator=gen) * 0.5 for _ in range(layers)]
        rope = llama_cos_sin(torch.arange(512), d)
    info = dict(model_type="llama", num_hidden_layers=layers, num_attention_heads=2 * kv_heads,
                num_key_value_heads=kv_heads, head_dim=d, hidden_size=2 * kv_heads * d)
    calib = RotateKVCalibration(config=cfg, model_info=info, head_group_size=g, key_orders=orders, key_means=means)
    return vb.RotateKVRuntime.from_calibration(calib, f"rotkv{cfg.key_bits}", dtype=torch.bfloat16, rope=rope)


class Backend:
    """One implementation of the backend (builder + one impl and one cache per layer)."""

    def __init__(self, rt, impl: str, monkeypatch, *, num_blocks, block_size, heads, precision="fp32"):
        monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, impl)
        monkeypatch.setenv(vb.TRITON_PRECISION_ENV, precision)
        d, hkv = rt.layout.head_dim, rt.layout.num_kv_heads
        spec = vb.RotateKVAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=block_size, num_kv_heads=hkv, head_size=d, dtype=torch.uint8))
        self.builder = vb.RotateKVAttentionMetadataBuilder(spec, ["l"], None, torch.device("cpu"), runtime=rt)
        assert self.builder.attention_impl == impl
        self.impls = [vb.RotateKVAttentionImpl(heads, d, d ** -0.5, hkv, None, None, f"rotkv{rt.config.key_bits}",
                                               runtime=rt) for _ in range(rt.num_layers)]
        self.caches = [alloc_paged_cache(rt.paged_spec(i), num_blocks, block_size, rt.dtype, fill=0xFF)
                       for i in range(rt.num_layers)]
        for i, c in enumerate(self.caches):
            assert c.kv_cache.stride(0) == rt.page_bytes(block_size)  # what vLLM's planner allocates
            self.impls[i]._layer = i
        monkeypatch.delenv(vb.ATTENTION_IMPL_ENV)


class Twin:
    """Feeds the same steps to a ``torch`` and a ``triton`` backend."""

    def __init__(self, rt, monkeypatch, *, num_blocks=40, block_size=16, heads=8, precision="fp32", exact=True,
                 seed=0):
        vb.install_runtime(rt)
        self.rt, self.bs, self.heads, self.exact = rt, block_size, heads, exact
        self.gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=self.gen).tolist()  # scattered physical blocks
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}
        self.hist: dict[tuple[int, str], list[torch.Tensor]] = {}  # (layer, request) -> K/V [2, H, D] per position
        kw = dict(num_blocks=num_blocks, block_size=block_size, heads=heads)
        self.torch = Backend(rt, "torch", monkeypatch, **kw)
        self.triton = Backend(rt, "triton", monkeypatch, precision=precision, **kw)
        self.precision = precision

    def step(self, work: dict[str, int], pad: int = 3):
        """One step (``work[req] = new tokens``): builds vLLM's metadata, runs both backends' ``forward`` on
        every layer. Returns per layer ``(torch output, triton output, query)`` and the step's tensors."""
        names = list(work)
        before = [self.lens.get(n, 0) for n in names]
        seq = [b + work[n] for b, n in zip(before, names)]
        for n, s in zip(names, seq):
            tab = self.tables.setdefault(n, [])
            while len(tab) * self.bs < s:
                tab.append(self.free.pop())
            self.lens[n] = s
        table = torch.zeros(len(names), max(len(self.tables[n]) for n in names) + 2, dtype=torch.int32)
        for i, n in enumerate(names):
            table[i, : len(self.tables[n])] = torch.tensor(self.tables[n])
        slots, pos = [], []
        for i, n in enumerate(names):
            for p in range(before[i], seq[i]):
                slots.append(self.tables[n][p // self.bs] * self.bs + p % self.bs)
                pos.append(p)
        t = len(slots)
        slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.int64)  # vLLM pads the token count
        qsl = torch.tensor([0] + torch.tensor([work[n] for n in names]).cumsum(0).tolist(), dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=len(names), num_actual_tokens=t + pad, max_query_len=max(work.values()),
            max_seq_len=max(seq), block_table_tensor=table, slot_mapping=slot_mapping,
        )
        md_torch, md_tri = self.torch.builder.build(0, cm), self.triton.builder.build(0, cm)
        assert md_tri.attention_impl == "triton" and not md_tri.tiles
        rt, d, hkv = self.rt, self.rt.layout.head_dim, self.rt.layout.num_kv_heads
        positions = torch.tensor(pos + [0] * pad)
        n = t + pad
        outs = []
        for li in range(rt.num_layers):
            if self.exact:  # k / 32, |k| < 256: exact in bf16, every rotation sum exact in fp32
                k_pre = torch.randint(-255, 256, (n, hkv, d), generator=self.gen).float() / 32
                v = torch.randint(-255, 256, (n, hkv, d), generator=self.gen).float() / 32
            else:
                k_pre = torch.randn(n, hkv, d, generator=self.gen)
                k_pre[:, :, 5] += 3.0  # an outlier channel, as real keys have
                v = torch.randn(n, hkv, d, generator=self.gen)
            if rt.config.pre_rope:
                c, s = rt.rope_cos[positions][:, None], rt.rope_sin[positions][:, None]
                k_pre = k_pre * c + rotate_half(k_pre) * s
            k, v = k_pre.to(torch.bfloat16), v.to(torch.bfloat16)
            q = torch.randn(n, self.heads, d, generator=self.gen).to(torch.bfloat16)
            layer = type("L", (), {"layer_name": f"model.layers.{li}.self_attn.attn"})()
            pair = []
            for be, md in ((self.torch, md_torch), (self.triton, md_tri)):
                out = torch.full((n, self.heads, d), float("nan"), dtype=torch.bfloat16)
                be.impls[li].forward(layer, q, k, v, be.caches[li].kv_cache, md, out)
                pair.append(out)
            outs.append((pair[0], pair[1], q))
            j = 0
            for name in names:
                for _ in range(work[name]):
                    self.hist.setdefault((li, name), []).append(torch.stack((k[j], v[j])))
                    j += 1
        step = dict(t=t, qsl=qsl, seq=seq, table=table, md_torch=md_torch, md_tri=md_tri, positions=positions,
                    names=names, before=before)
        return outs, step

    def window(self, li: int, step) -> tuple:
        """The recent window's full-precision inputs of ``step`` from the steps' own K/V (never from the rings):
        the step's tokens ``[T, H, D]`` (zero rows for the padding tokens) and the ``R - 1`` positions before each
        request's step (zeros before position 0)."""
        sp = self.rt.paged_spec(li)
        r = sp.recent_window
        own = torch.cat([torch.stack(self.hist[(li, nm)][b:]) for nm, b in zip(step["names"], step["before"])])
        prev = torch.zeros(len(step["names"]), r - 1, 2, sp.num_kv_heads, sp.head_dim, dtype=torch.bfloat16)
        for i, (nm, b) in enumerate(zip(step["names"], step["before"])):
            for j, p_ in enumerate(range(b - (r - 1), b)):
                if p_ >= 0:
                    prev[i, j] = self.hist[(li, nm)][p_]
        own = torch.cat([own, own.new_zeros(step["positions"].shape[0] - own.shape[0], *own.shape[1:])])  # padding
        return own[:, 0], own[:, 1], (prev if r > 1 else None)

    def check_attention(self, li: int, out_torch, out_tri, q, step, cache=None):
        """Both outputs against the float64 reference over ``cache`` (default: the torch backend's), and
        against each other within the sum of their bounds (module docstring)."""
        rt, qsl = self.rt, step["qsl"]
        n_q = int(qsl[-1])
        sp = rt.paged_spec(li)
        cache = cache if cache is not None else self.torch.caches[li]
        p = rt.kernel_params(li, torch.device("cpu"))
        kw = dict(spec=sp, scale=sp.head_dim ** -0.5, sinks=cache.sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin,
                  key_perm=p.key_perm, key_mean=p.key_mean)
        if sp.recent_window:
            key, value, prev = self.window(li, step)
            kw.update(recent_key=key, recent_value=value, recent_prev=prev)
        ref = paged_attention_ref(q[:n_q], cache.records, step["table"], torch.tensor(step["seq"]), qsl,
                                  out_dtype=torch.float32, **kw).double()
        assert torch.isfinite(ref).all()
        plan = step["md_tri"].paged_plan(sp, self.heads)
        case = SimpleNamespace(spec=sp, hq=self.heads, ctx=step["seq"], block_size=self.bs, t=dict(
            query=q[:n_q], cos=p.rope_cos, sin=p.rope_sin, perm=p.key_perm, mean=p.key_mean, tables=step["table"],
            qsl=qsl))
        b_tri = attention_bound(case, cache, ref, lowp=self.precision == "fp16", num_splits=plan.num_splits,
                                block_n=plan.block_n)
        b_tri = b_tri * (1 + BF16_U) + BF16_U * ref.abs()  # one bf16 rounding of the fused output
        b_torch = BF16_U * float(ref.abs().max()) + 1e-5
        got_tri, got_torch = out_tri[:n_q].double(), out_torch[:n_q].double()
        err_tri = (got_tri - ref).abs()
        assert (err_tri <= b_tri).all(), f"layer {li}: fused max err {err_tri.max():.3g}"
        assert float((got_torch - ref).abs().max()) <= b_torch, f"layer {li}: torch path off the reference"
        diff = (got_tri - got_torch).abs()
        assert (diff <= b_tri + b_torch).all(), f"layer {li}: paths differ by {diff.max():.3g}"
        # padding rows (tokens past query_start_loc[-1]) are never written by either path
        assert torch.isnan(out_tri[n_q:].float()).all() and torch.isnan(out_torch[n_q:].float()).all()


STEPS = ({"a": 37, "b": 5}, {"a": 1, "b": 12, "c": 20}, {"c": 1, "a": 1, "b": 1, "d": 2}, {"b": 1, "c": 1, "d": 1})

CONFIGS = {
    # 2 bits, 3 sink tokens, centered keys, value groups of 32, GQA 8 query heads over 2 KV heads rotated together
    "k2-sinks-centered-gqa4": (RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=3, center_keys=True,
                                                       group_size=64, value_group_size=32), {}, "fp32"),
    # 4 bits, no sinks, keys stored post-RoPE, values not rotated, one head per rotation block, GQA 2
    "k4-nosink-postrope-vnorot": (RotateKVConfig.for_bits(4, sink_mode="none", pre_rope=False, rotate_values=False),
                                  dict(kv_heads=2, d=32, g=1), "fp32"),
    # 2 bits with a 4-bit boosted layer (the 2-bit layer's slots are padded), fp16 products (the CUDA default)
    "k2-boosted-k4-fp16": (RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=1, boosted_layers=(1,),
                                                   boost_bits=4), {}, "fp16"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_forward_matches_torch_path(interpreter, monkeypatch, name):
    """Mixed prefill/decode steps over many scattered blocks with odd context lengths: byte-identical caches
    after every step, and outputs within the derived bound of each other and of the reference."""
    cfg, shape, precision = CONFIGS[name]
    rt = _runtime(cfg, **shape)
    heads = 4 * rt.layout.num_kv_heads if name.endswith("gqa4") else 2 * rt.layout.num_kv_heads
    twin = Twin(rt, monkeypatch, heads=heads, precision=precision)
    for work in STEPS:
        outs, step = twin.step(work)
        for li, (o_torch, o_tri, q) in enumerate(outs):
            assert torch.equal(twin.torch.caches[li].raw, twin.triton.caches[li].raw), f"layer {li}: cache bytes"
            twin.check_attention(li, o_torch, o_tri, q, step)
        assert len(step["md_tri"]._plans) == 1  # planned once per step, shared by the layers
    # the records are not vacuous: every position of every request was written, sinks hold the model's K
    for li in range(rt.num_layers):
        c = twin.triton.caches[li]
        for n, tab in twin.tables.items():
            pos = torch.arange(twin.lens[n])
            rec = c.records[torch.tensor(tab)[pos // twin.bs], pos % twin.bs]
            assert (rec[:, : rt.paged_spec(li).key_bytes] != 0xFF).any(dim=1).all()


def test_fused_attend_on_gaussian_cache_real_rope(interpreter, monkeypatch):
    """Gaussian keys with an outlier channel and Llama's RoPE tables (records no longer bit-identical between
    the two encoders): the fused attention reads the torch path's cache and matches its outputs."""
    cfg = RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=2, center_keys=True)
    rt = _runtime(cfg, layers=1, exact=False, seed=1)
    twin = Twin(rt, monkeypatch, heads=8, exact=False, seed=1)
    for work in STEPS[:3]:
        outs, step = twin.step(work)
        o_torch, _, q = outs[0]
        out = torch.full_like(o_torch, float("nan"))
        # the fused attention alone, over the torch path's records (already holding this step's tokens)
        twin.triton.impls[0].attend(0, q, twin.torch.caches[0].kv_cache, step["md_tri"], out, twin.window(0, step))
        twin.check_attention(0, o_torch, out, q, step, cache=twin.torch.caches[0])


def test_paged_spec_page_bytes_match_runtime():
    """The spec handed to the kernels describes vLLM's page exactly, for every layer (boosted layers pad)."""
    cases = [
        RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=4),
        RotateKVConfig.for_bits(3, sink_mode="none", scale_format="fp8"),
        RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=2, boosted_layers=(0,), boost_bits=4,
                                value_group_size=32, rotate_values=False),
    ]
    for cfg in cases:
        rt = _runtime(cfg, layers=3, kv_heads=4, d=64, g=2)
        for li in range(3):
            sp, codec = rt.paged_spec(li), rt.codec(li)
            assert (sp.key_bits, sp.value_bits) == (codec.key_bits, codec.value_bits)
            assert (sp.key_bytes, sp.value_bytes) == (codec.key_bytes, codec.value_bytes)
            assert sp.record_bytes == rt.record_bytes and sp.sink_tokens == rt.sink_tokens
            assert sp.key_rot_width == rt.layout.group_width
            for bs in (16, 48, 256):
                assert sp.page_bytes(bs, rt.dtype) == rt.page_bytes(bs)


def test_kernel_params_built_once_per_layer_and_device():
    rt = _runtime(RotateKVConfig.for_bits(2, sink_mode="none", center_keys=True), layers=2)
    cpu = torch.device("cpu")
    p0 = rt.kernel_params(0, cpu)
    assert rt.kernel_params(0, cpu) is p0  # cached, not rebuilt per step
    p1 = rt.kernel_params(1, cpu)
    assert p1.rope_cos is p0.rope_cos  # one copy of the RoPE tables per device
    assert not torch.equal(p1.key_perm, p0.key_perm)
    assert torch.equal(p0.key_perm[p0.inv_perm], torch.arange(rt.layout.kv_width))
    assert torch.equal(p0.key_perm, rt.codec(0).key_order) and torch.equal(p0.key_mean, rt.codec(0).key_mean)


def test_token_positions_match_the_torch_builder():
    """The fused builder's device-side positions equal the torch builder's, padding tokens at 0."""
    qsl = torch.tensor([0, 5, 6, 6, 17], dtype=torch.int32)  # a request with no new token in the middle
    seq = torch.tensor([9, 40, 3, 11], dtype=torch.int32)
    got = vb.token_positions(qsl, seq, 20)
    want = torch.cat([torch.arange(4, 9), torch.tensor([39]), torch.arange(0, 11), torch.zeros(3, dtype=torch.int64)])
    assert torch.equal(got, want)
    assert torch.equal(vb.token_positions(qsl[:1], seq[:0], 2), torch.zeros(2, dtype=torch.int64))


def test_selection_env_and_errors(monkeypatch):
    monkeypatch.delenv(vb.ATTENTION_IMPL_ENV, raising=False)
    # the CPU default, whatever TRITON_INTERPRET says: the fused C++ kernels (scripts/setup.sh builds them)
    assert vb.select_attention_impl("cpu") == "cpp"
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, "cuda-please")
    with pytest.raises(ValueError,
                       match=r"ROTKV_ATTENTION_IMPL='cuda-please': expected one of auto, cpp, torch, triton"):
        vb.select_attention_impl("cpu")
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, "torch")
    with pytest.raises(ValueError, match="CPU caches only"):
        vb.select_attention_impl(torch.device("cuda", 0))  # no CUDA needed: only the device type is read
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, "cpp")
    with pytest.raises(ValueError, match="ROTKV_ATTENTION_IMPL=cpp: the C.. kernels serve CPU caches only"):
        vb.select_attention_impl("cuda")
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, "Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        vb.select_attention_impl("cpu")
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, "auto")
    from rotkv_kernels.rotkv_cache import triton_available

    if triton_available():
        assert vb.select_attention_impl("cuda") == "triton"  # the CUDA default
    with pytest.raises(ValueError, match="CPU and CUDA"):
        vb.select_attention_impl("meta")
    monkeypatch.setenv(vb.TRITON_PRECISION_ENV, "bf16")
    with pytest.raises(ValueError, match=r"ROTKV_TRITON_PRECISION='bf16': expected one of fp16, fp32"):
        vb.triton_precision()


def test_forward_refuses_fused_metadata_without_interpreter(interpreter, monkeypatch):
    """A step built for the fused path is checked against the cache's device when a layer first runs it: on
    the CPU without the interpreter it fails loudly instead of running something else."""
    rt = _runtime(RotateKVConfig.for_bits(2, sink_mode="none"), layers=1)
    twin = Twin(rt, monkeypatch, heads=4)
    _, step = twin.step({"a": 3})
    impl = vb.RotateKVAttentionImpl(4, 64, 0.125, 2, None, None, "rotkv2", runtime=rt)
    impl._layer = 0
    layer = type("L", (), {"layer_name": "model.layers.0.self_attn.attn"})()
    q = torch.zeros(6, 4, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        impl.forward(layer, q, None, None, twin.triton.caches[0].kv_cache, step["md_tri"], q.clone())
