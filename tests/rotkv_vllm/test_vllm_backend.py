"""The RotateKV vLLM attention backend, driven step by step like the engine drives it, against the kernels'
references (``rotkv_write_ref`` / ``rotkv_read_ref``) and a float64 softmax attention.

No engine here: a paged uint8 cache laid out as vLLM lays out a padded page (``as_strided`` over one raw
buffer), vLLM's ``CommonAttentionMetadata`` built by hand with scattered block tables, and steps that mix
prefill chunks, decodes and new requests.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from rotkv_kernels.rotkv_cache import record_bytes, rotate_half, rotkv_read_ref, rotkv_write_ref  # noqa: E402
from rotkv_kernels import rotkv_paged_tiles as paged_tiles  # noqa: E402
from rotkv_kernels.rotkv_paged import inverse_rope_ref  # noqa: E402
from rotkv_vllm import vllm_backend as vb  # noqa: E402
from rotkv_vllm.calibration import RotateKVCalibration  # noqa: E402
from rotkv_vllm.config import DEFAULT_RECENT_WINDOW, RotateKVConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _no_runtime_leak():
    yield
    vb.install_runtime(None)


def _rope(d: int, n: int = 4096, theta: float = 10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([f.cos(), f.cos()], -1).float(), torch.cat([f.sin(), f.sin()], -1).float()


def _calibration(cfg: RotateKVConfig, layers: int, kv_heads: int, d: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = kv_heads * d
    orders = []
    for _ in range(layers):
        blocks = [torch.randperm(g * d, generator=gen) + j * g * d for j in range(kv_heads // g)]
        orders.append(torch.cat(blocks).to(torch.int64))
    info = dict(model_type="llama", num_hidden_layers=layers, num_attention_heads=2 * kv_heads,
                num_key_value_heads=kv_heads, head_dim=d, hidden_size=2 * kv_heads * d)
    means = [torch.randn(w, generator=gen) for _ in range(layers)]
    return RotateKVCalibration(config=cfg, model_info=info, head_group_size=g, key_orders=orders, key_means=means)


def _runtime(cfg, layers=2, kv_heads=2, d=64, g=2, tp_rank=0, tp_size=1):
    calib = _calibration(cfg, layers, kv_heads, d, g)
    bits = cfg.key_bits
    return vb.RotateKVRuntime.from_calibration(calib, f"rotkv{bits}", dtype=torch.bfloat16, rope=_rope(d),
                                               tp_rank=tp_rank, tp_size=tp_size), calib


class PagedCache:
    """One layer's cache as vLLM allocates it: a raw byte buffer, pages ``page_bytes`` apart."""

    def __init__(self, rt, num_blocks: int, block_size: int):
        page = rt.page_bytes(block_size)
        self.raw = torch.full((num_blocks * page + 64,), 0xFF, dtype=torch.uint8)  # garbage, not zeros
        c = rt.record_bytes
        self.view = torch.as_strided(self.raw, (num_blocks, 1, block_size, c), (page, block_size * c, c, 1), 32)


class Engine:
    """Feeds the backend the metadata vLLM would build, and keeps the history for the reference."""

    def __init__(self, rt, *, num_blocks=64, block_size=16, heads=4, seed=0):
        self.rt, self.bs, self.nb = rt, block_size, num_blocks
        self.h, self.hkv, self.d = heads, rt.layout.num_kv_heads, rt.layout.head_dim
        self.gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=self.gen).tolist()  # scattered physical blocks
        self.tables: dict[str, list[int]] = {}
        self.hist: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.caches = [PagedCache(rt, num_blocks, block_size) for _ in range(rt.num_layers)]
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=self.hkv, head_size=self.d,
                                 dtype=torch.uint8)
        vb.install_runtime(rt)  # what the first attention layer does in a worker
        self.spec = vb.RotateKVAttentionBackend.customize_spec(spec)
        self.builder = vb.RotateKVAttentionMetadataBuilder(self.spec, ["l"], None, torch.device("cpu"), runtime=rt)
        self.impls = [vb.RotateKVAttentionImpl(heads, self.d, self.d ** -0.5, self.hkv, None, None,
                                               f"rotkv{rt.config.key_bits}", runtime=rt)
                      for _ in range(rt.num_layers)]
        for i, impl in enumerate(self.impls):
            impl._layer = i

    def step(self, work: dict[str, int], scale: float = 1.0):
        """Run one step: ``work[req] = new tokens``. Returns (outputs per layer, queries, req of each token)."""
        names = list(work)
        q_lens = [work[n] for n in names]
        before = [len(self.hist[n]["k"]) if n in self.hist else 0 for n in names]
        seq = [b + q for b, q in zip(before, q_lens)]
        for n, s in zip(names, seq):
            tab = self.tables.setdefault(n, [])
            while len(tab) * self.bs < s:
                tab.append(self.free.pop())
            self.hist.setdefault(n, {"k": []})
        width = max(len(self.tables[n]) for n in names)
        table = torch.zeros(len(names), width + 2, dtype=torch.int32)
        for i, n in enumerate(names):
            table[i, : len(self.tables[n])] = torch.tensor(self.tables[n])
        t = sum(q_lens)
        slots, qtok = [], []
        for i, n in enumerate(names):
            for p in range(before[i], seq[i]):
                slots.append(self.tables[n][p // self.bs] * self.bs + p % self.bs)
                qtok.append((n, p))
        pad = 3  # vLLM may pad the token count; padded tokens carry slot -1
        slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.int64)
        qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=len(names), num_actual_tokens=t, max_query_len=max(q_lens), max_seq_len=max(seq),
            block_table_tensor=table, slot_mapping=slot_mapping,
        )
        md = self.builder.build(0, cm)
        cos, sin = _rope(self.d)
        pos = torch.tensor([p for _, p in qtok])
        outs, queries = [], []
        for li, impl in enumerate(self.impls):
            k_pre = torch.randn(t + pad, self.hkv, self.d, generator=self.gen) * scale
            k_pre[:, :, 5] += 3.0  # an outlier channel, as real keys have
            v = (torch.randn(t + pad, self.hkv, self.d, generator=self.gen) * scale).to(torch.bfloat16)
            q = (torch.randn(t + pad, self.h, self.d, generator=self.gen)).to(torch.bfloat16)
            c = torch.cat([cos[pos], cos[:pad]])[:, None]
            s = torch.cat([sin[pos], sin[:pad]])[:, None]
            k_post = (k_pre * c + rotate_half(k_pre) * s).to(torch.bfloat16)
            out = torch.full((t + pad, self.h, self.d), float("nan"), dtype=torch.bfloat16)
            layer = type("L", (), {"layer_name": f"model.layers.{li}.self_attn.attn"})()
            impl.forward(layer, q, k_post, v, self.caches[li].view, md, out)
            outs.append(out[:t])
            queries.append(q[:t])
            for j, (n, p) in enumerate(qtok):
                self.hist[n].setdefault(f"k{li}", []).append(k_post[j])
                self.hist[n].setdefault(f"v{li}", []).append(v[j])
        for n, p in qtok:
            self.hist[n]["k"].append(p)
        return outs, queries, qtok

    def reference(self, li: int, n: str, upto: int, q: torch.Tensor) -> torch.Tensor:
        """fp64 attention of one query (``[H, D]``) over positions ``0..upto`` of request ``n``, K/V from the
        kernels' references (write then read), sink positions and the recent window (positions ``upto - R + 1 ..
        upto``, the preset's window) in the model dtype as produced."""
        rt, cfg, lay = self.rt, self.rt.config, self.rt.layout
        codec = rt.codec(li)
        k_post = torch.stack(self.hist[n][f"k{li}"][: upto + 1])
        v = torch.stack(self.hist[n][f"v{li}"][: upto + 1])
        pos = torch.arange(upto + 1)
        k_in = k_post.float()
        if cfg.pre_rope:
            k_in = inverse_rope_ref(k_post, rt.rope_cos[pos], rt.rope_sin[pos])
        mu = codec.key_mean.view(self.hkv, self.d) if cfg.center_keys else torch.zeros(self.hkv, self.d)
        krec = rotkv_write_ref(k_in - mu, bits=codec.key_bits, group_size=lay.group_size,
                               rot_width=lay.group_width, perm=codec.key_order, clip_ratio=codec.key_clip,
                               scale_format=cfg.scale_format)
        kq = rotkv_read_ref(krec, num_heads=self.hkv, head_dim=self.d, bits=codec.key_bits,
                            group_size=lay.group_size, rot_width=lay.group_width, perm=codec.key_order,
                            scale_format=cfg.scale_format) + mu
        if cfg.pre_rope:
            c, s_ = rt.rope_cos[pos][:, None], rt.rope_sin[pos][:, None]
            kq = kq * c + rotate_half(kq) * s_
        vw = self.d if cfg.rotate_values else 1
        vrec = rotkv_write_ref(v.float(), bits=codec.value_bits, group_size=lay.value_group_size, rot_width=vw,
                               clip_ratio=codec.value_clip, scale_format=cfg.scale_format)
        vq = rotkv_read_ref(vrec, num_heads=self.hkv, head_dim=self.d, bits=codec.value_bits,
                            group_size=lay.value_group_size, rot_width=vw, scale_format=cfg.scale_format)
        s = rt.sink_tokens
        kq[:s] = k_post[:s].float()
        vq[:s] = v[:s].float()
        w = max(0, upto + 1 - rt.recent_window)
        kq[w:] = k_post[w:].float()
        vq[w:] = v[w:].float()
        rep = self.h // self.hkv
        kq = kq.double().repeat_interleave(rep, dim=1)  # [S, H, D]
        vq = vq.double().repeat_interleave(rep, dim=1)
        scores = torch.einsum("hd,shd->hs", q.double(), kq) / math.sqrt(self.d)
        return torch.einsum("hs,shd->hd", scores.softmax(-1), vq)


def _check(eng: Engine, outs, queries, qtok):
    for li in range(eng.rt.num_layers):
        got = outs[li].double()
        ref = torch.stack([eng.reference(li, n, p, queries[li][j]) for j, (n, p) in enumerate(qtok)])
        # Both sides dequantize the same bytes; the backend then runs fp32 SDPA and rounds to bf16.
        # bf16 rounding of outputs of magnitude <= max|V| bounds the error by 2**-8 * max|V|.
        bound = 2.0 ** -8 * float(ref.abs().max()) + 1e-5
        err = float((got - ref).abs().max())
        assert err <= bound, f"layer {li}: max error {err:.3g} > {bound:.3g}"


CONFIGS = {
    "k2v2-sinks": RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=3),
    "k3v3-fp8-nosink": RotateKVConfig.for_bits(3, sink_mode="none", scale_format="fp8"),
    "k2-centered-vgroup32": RotateKVConfig.for_bits(2, sink_mode="first", max_sink_tokens=2, center_keys=True,
                                                    group_size=64, value_group_size=32),
    "k4-boosted-post-rope": RotateKVConfig.for_bits(4, sink_mode="first", max_sink_tokens=1, pre_rope=False,
                                                    rotate_values=False, boosted_layers=(1,), boost_bits=4),
}


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_steps_match_kernel_references(name, impl, monkeypatch):
    """Prefill chunks, decodes and new requests in one batch; many scattered blocks; every output equals
    attention over what the references decode from the same records (the fused C++ kernels and the PyTorch
    path, each forced by ``ROTKV_ATTENTION_IMPL``)."""
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, impl)
    rt, _ = _runtime(CONFIGS[name])
    eng = Engine(rt, num_blocks=48, block_size=16)
    assert eng.builder.attention_impl == impl
    _check(eng, *eng.step({"a": 37, "b": 5}))  # two prefills (a spans 3 blocks)
    _check(eng, *eng.step({"a": 1, "b": 12, "c": 20}))  # decode + chunked prefill + new prefill
    _check(eng, *eng.step({"c": 1, "a": 1, "b": 1, "d": 2}))  # decodes and a tiny prefill


def test_tiles_split_large_requests_same_result(monkeypatch):
    """Tiny tile budgets force query-range splitting and one request per tile; results are unchanged (the
    PyTorch path: the C++ kernels, the CPU default, plan no tiles)."""
    monkeypatch.setenv(vb.ATTENTION_IMPL_ENV, "torch")
    rt, _ = _runtime(CONFIGS["k2v2-sinks"])
    orig, plans = paged_tiles.plan_tiles, []  # what rotkv_paged_tiles.step_tiles, the builder's planner, calls
    monkeypatch.setattr(paged_tiles, "plan_tiles",
                        lambda q, s, **kw: plans.append(orig(q, s, context_budget=40, score_budget=200, **kw))
                        or plans[-1])
    eng = Engine(rt, num_blocks=32, block_size=16)
    _check(eng, *eng.step({"a": 45, "b": 3}))
    _check(eng, *eng.step({"a": 1, "b": 30}))
    assert plans and any(len(p) > 2 for p in plans)  # the builder planned with the tiny budgets: split tiles


def test_plan_tiles_covers_every_query_once():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(1, 300, (40,), generator=gen).tolist()
    q[::3] = [1] * len(q[::3])
    s = [qq + int(x) for qq, x in zip(q, torch.randint(0, 2000, (40,), generator=gen))]
    seen = {}
    for reqs, lo, hi in paged_tiles.plan_tiles(q, s, context_budget=4096, score_budget=1 << 18):
        big = max(s[r] for r in reqs)
        if len(reqs) > 1:
            assert len(reqs) * big <= 4096 and len(reqs) * max(q[r] for r in reqs) * big <= 1 << 18
        for r in reqs:
            for j in range(lo, min(hi, q[r])):
                seen[(r, j)] = seen.get((r, j), 0) + 1
    assert seen == {(r, j): 1 for r in range(40) for j in range(q[r])}


def test_sinks_survive_in_first_block_only():
    """Sink K/V land in the first block's sink area, byte-exact, and are what attention reads."""
    rt, _ = _runtime(CONFIGS["k2v2-sinks"], layers=1)
    eng = Engine(rt, num_blocks=16, block_size=16)
    eng.step({"a": 20})
    _, sinks = eng.impls[0]._cache_views(eng.caches[0].view)
    first = eng.tables["a"][0]
    k = torch.stack(eng.hist["a"]["k0"][:3])
    assert torch.equal(sinks[first, :3, 0], k)  # the S = 3 sinks come first; the ring slots follow
    # Corrupting the records of the sink positions changes nothing: reads use the sink area.
    eng.caches[0].view[first, 0, :3].fill_(0xFF)
    _check(eng, *eng.step({"a": 1}))


def test_packed_layout_byte_count():
    """Bytes per token are exactly the formula: ``W * (bits + 32 / G) / 8`` for K and for V (fp16 scale and
    zero), plus S sink tokens and the recent window's R - 1 ring slots of 2 * W * 2 bytes per block; the spec
    hands vLLM exactly that page."""
    for bits, fmt, per_group in ((2, "fp16", 4), (3, "fp16", 4), (4, "fp16", 4), (2, "fp8", 2)):
        cfg = RotateKVConfig.for_bits(bits, sink_mode="first", max_sink_tokens=4, group_size=128,
                                      value_group_size=128, scale_format=fmt)
        rt, _ = _runtime(cfg, kv_heads=4, d=64, g=4)
        w = 4 * 64
        per_elem = bits + 8 * per_group / 128  # 2.25 bits at 2 bits + fp16, group 128
        assert rt.record_bytes == 2 * w * per_elem / 8 == 2 * record_bytes(w, bits, 128, fmt)
        spec = FullAttentionSpec(block_size=128, num_kv_heads=4, head_size=64, dtype=torch.uint8)
        vb.install_runtime(rt)
        out = vb.RotateKVAttentionBackend.customize_spec(spec)
        ring = DEFAULT_RECENT_WINDOW - 1
        assert rt.ring_slots == ring
        assert out.page_size_bytes == 128 * rt.record_bytes + (4 + ring) * 2 * w * 2
        assert out.num_heads == 1 and out.state_content_size_bytes == rt.record_bytes
        dense = FullAttentionSpec(block_size=128, num_kv_heads=4, head_size=64, dtype=torch.bfloat16)
        ratio = dense.page_size_bytes / out.page_size_bytes
        assert ratio == pytest.approx(16 / (per_elem + (4 + ring) * 16 / 128), rel=1e-12)


def test_boosted_layers_pad_to_largest_record():
    cfg = RotateKVConfig.for_bits(2, sink_mode="none", boosted_layers=(0,), boost_bits=4)
    rt, _ = _runtime(cfg, layers=3)
    assert rt.codec(0).key_bytes > rt.codec(1).key_bytes
    assert rt.record_bytes == rt.codec(0).key_bytes + rt.codec(0).value_bytes


def test_inverse_rope_recovers_pre_rope_keys():
    cos, sin = _rope(64)
    k = torch.randn(50, 3, 64, dtype=torch.float64)
    pos = torch.randint(0, 4096, (50,))
    c, s = cos[pos].double()[:, None], sin[pos].double()[:, None]
    post = k * c + rotate_half(k) * s
    back = inverse_rope_ref(post.float(), cos[pos], sin[pos]).double()
    # fp32 arithmetic on O(1) values: a few ulps of fp32 per element.
    assert float((back - k).abs().max()) < 1e-5 * float(k.abs().max())
    scaled = inverse_rope_ref((post * 1.7).float(), cos[pos] * 1.7, sin[pos] * 1.7).double()  # mscale folded in
    assert float((scaled - k * 1.7 / 1.7).abs().max()) < 1e-5 * float(k.abs().max())


@pytest.mark.parametrize("field,value,needle", [
    ("sink_mode", "topk", "sink_mode='first'"),
])
def test_refuses_configs_it_cannot_serve(field, value, needle):
    cfg = dataclasses.replace(RotateKVConfig.for_bits(2, sink_mode="first"), **{field: value})
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        _runtime(cfg)


def test_tensor_parallel_ranks_take_their_own_heads_and_orders():
    """With 4 KV heads over 2 ranks each rank's layout holds 2 heads; its key order is the calibrated one
    restricted to its heads (local indices), and head groups never straddle the ranks."""
    cfg = RotateKVConfig.for_bits(2, sink_mode="none")
    calib = _calibration(cfg, 2, 4, 64, 2)
    full = calib.key_orders[1]
    for rank in range(2):
        rt = vb.RotateKVRuntime.from_calibration(calib, "rotkv2", dtype=torch.bfloat16, rope=_rope(64),
                                                 tp_rank=rank, tp_size=2)
        assert rt.layout.num_kv_heads == 2 and rt.layout.group_width == 128
        local = rt.codec(1).key_order
        assert torch.equal(local + rank * 128, full[rank * 128:(rank + 1) * 128])
        assert torch.equal(local.sort().values, torch.arange(128))
    with pytest.raises(ValueError, match="tensor"):
        _calibration(cfg, 2, 4, 64, 4).layout(2)  # a group of 4 heads cannot split over 2 ranks


# ---- start-up resolution against a model folder -------------------------------------------------------
class _ModelConfig:
    def __init__(self, folder, hf):
        self.model, self.revision, self.hf_text_config = str(folder), None, hf
        self.dtype, self.max_model_len = torch.bfloat16, 512


def _vllm_config(folder, hf):
    return type("VllmConfig", (), {"model_config": _ModelConfig(folder, hf)})()


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, head_dim=32, max_position_embeddings=1024)
    base.update(kw)
    return LlamaConfig(**base)


def test_resolve_refuses_missing_calibration_with_the_command(tmp_path):
    hf = _llama_config()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no RotateKV calibration[\s\S]*python -m rotkv_vllm.calibration"):
        vb.resolve_runtime(_vllm_config(tmp_path, hf), "rotkv2")


@pytest.mark.parametrize("model_type,extra,needle", [
    ("mistral", {"sliding_window": 2}, "window of 2 tokens, shorter than the preset's full-precision recent window"),
    ("gemma", {}, "not supported"),
    ("gpt2", {}, "no RoPE"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "layer_types": ["sliding_attention"] * 2},
     "sliding window of 3 tokens"),
    ("deepseek_v3", {"kv_lora_rank": 512}, "not supported"),
])
def test_resolve_refuses_unsupported_models(tmp_path, model_type, extra, needle):
    hf = _llama_config(**extra)
    hf.model_type = model_type
    with pytest.raises(ValueError, match=needle):
        vb.resolve_runtime(_vllm_config(tmp_path, hf), "rotkv2")


def test_resolve_refuses_speculative_decoding_with_the_recent_window(tmp_path):
    # The refusal comes before the calibration lookup: this folder has none.
    hf = _llama_config()
    cfg = _vllm_config(tmp_path, hf)
    cfg.speculative_config = object()
    with pytest.raises(ValueError, match="speculative decoding is not supported"):
        vb.resolve_runtime(cfg, "rotkv2")
    cfg.speculative_config = None
    with pytest.raises(ValueError, match="no RotateKV calibration"):
        vb.resolve_runtime(cfg, "rotkv2")


def test_resolve_calibrated_folder_and_rope_tables_match_transformers(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rotkv_vllm.calibration import save_calibration

    hf = _llama_config(rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    cfg = RotateKVConfig.for_bits(2, sink_mode="first", center_keys=False)
    cal = _calibration(cfg, 2, 4, 32, 4)
    cal.model_info.update(hidden_size=256, num_attention_heads=8)
    save_calibration(cal, tmp_path)
    hf.save_pretrained(tmp_path)
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):  # vLLM's RoPE is a CustomOp, built under a config
        rt = vb.resolve_runtime(_vllm_config(tmp_path, hf), "rotkv3")
    assert rt.config.key_bits == 3 and rt.config.value_bits == 3 and rt.layout.num_kv_heads == 4
    assert vb.current_runtime() is rt
    assert vb.resolve_runtime(_vllm_config(tmp_path, hf), "rotkv3") is rt  # cached per (model, dtype, rank)
    pos = torch.tensor([[0, 1, 7, 500, 1023]])
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), pos)
    for layer in range(2):  # one table, shared by both layers
        assert rt.rope(layer)[0] is rt.rope(0)[0] and rt.sliding_window(layer) == 0
        assert torch.allclose(rt.rope(layer)[0][pos[0]], cos[0], atol=1e-6)
        assert torch.allclose(rt.rope(layer)[1][pos[0]], sin[0], atol=1e-6)


def test_resolve_gemma3_local_layers_get_their_window_and_rope_base(tmp_path):
    """Gemma 3 with a local layer (layer 0: sliding window 16, RoPE base 1e4) and a global one (base 1e6, linear
    scaling 8): the runtime's per-layer tables are the model's own rotary embedding of each layer type, and each
    layer's kernel spec carries its window."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from rotkv_vllm.calibration import save_calibration

    hf = Gemma3TextConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                          max_position_embeddings=1024, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"],
                          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                              "rope_theta": 1000000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    cal = _calibration(RotateKVConfig.for_bits(2, sink_mode="first", center_keys=False), 2, 2, 64, 2)
    cal.model_info.update(model_type="gemma3_text", hidden_size=128, num_attention_heads=4)
    save_calibration(cal, tmp_path)
    hf.save_pretrained(tmp_path)
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        rt = vb.resolve_runtime(_vllm_config(tmp_path, hf), "rotkv2")
    assert [rt.sliding_window(i) for i in range(2)] == [16, 0]
    assert [rt.paged_spec(i).sliding_window for i in range(2)] == [16, 0]
    assert rt.rope(0)[0] is not rt.rope(1)[0]
    pos = torch.tensor([[0, 1, 7, 500, 1023]])
    rotary = Gemma3RotaryEmbedding(hf)
    for layer, kind in enumerate(("sliding_attention", "full_attention")):
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos, layer_type=kind)
        assert torch.allclose(rt.rope(layer)[0][pos[0]], cos[0], atol=1e-6), kind
        assert torch.allclose(rt.rope(layer)[1][pos[0]], sin[0], atol=1e-6), kind
        # the kernels' tables of the layer are these
        assert torch.equal(rt.kernel_params(layer, "cpu").rope_cos, rt.rope(layer)[0])
