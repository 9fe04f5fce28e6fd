"""RotateKV on the real vLLM engine (CPU): the server, the capacity the engine reports, accuracy through
vLLM against the transformers reference, prefix caching, preemption, tensor parallelism, start-up errors.

Each offline engine runs in its own process (``rotkv_engine_job.py``); the server test shares one
``vllm serve`` for all its requests. The bundled SmolLM2-135M is calibrated once on
``calib_wikitext2_valid.txt`` into a serving folder (``$ROTKV_CACHE/vllm/SmolLM2-135M-Instruct``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.longest]

JOB = Path(__file__).with_name("rotkv_engine_job.py")
KV_GIB = 1
MAX_LEN = 2048  # a multiple of the block size, so the reported capacity is exactly blocks * block_size


def run_job(llm: dict, tasks: list[dict], env: dict | None = None, timeout: float = 900) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"llm": llm, "tasks": tasks, "env": env or {}}, f)
    # A single-rank engine runs its core inside the job's process (VLLM_ENABLE_V1_MULTIPROCESSING=0: a start of
    # seconds instead of ~a minute on this machine; the server tests keep vLLM's multiprocess layout).
    inproc = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if llm.get("tensor_parallel_size", 1) == 1 else {}
    full_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(KV_GIB), **inproc, **(env or {}))
    p = subprocess.run([sys.executable, str(JOB), f.name], capture_output=True, text=True, timeout=timeout,
                       env=full_env)
    os.unlink(f.name)
    for line in p.stdout.splitlines():
        if line.startswith("ROTKV_JOB_RESULT "):
            return json.loads(line[len("ROTKV_JOB_RESULT "):])
    raise AssertionError(f"engine job failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


@pytest.fixture(scope="module")
def served_model() -> Path:
    from rotkv_vllm.bundled_model import cache_root, ensure_smollm2
    from rotkv_vllm.demo import prepare_model, serving_config

    src = ensure_smollm2()
    return prepare_model(src, cache_root() / "vllm" / src.name, serving_config(2), num_sequences=8)


@pytest.fixture(scope="module")
def tokenizer(served_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_model)


@pytest.fixture(scope="module")
def windows(tokenizer) -> list[list[int]]:
    from rotkv_data import data_path

    ids = tokenizer(data_path("wikitext2_test.txt").read_text(encoding="utf-8")[:40_000],
                    add_special_tokens=False).input_ids
    return [ids[i * 256:(i + 1) * 256] for i in range(3)]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    from rotkv_data import data_path

    lines = data_path("wikitext2_test.txt").read_text(encoding="utf-8").splitlines()
    out = []
    for ln in lines[200:]:
        ids = tokenizer(ln.strip(), add_special_tokens=False).input_ids
        if len(ids) >= 48 and not ln.strip().startswith("="):
            out.append(ids[:48])
        if len(out) == 8:
            return out
    raise AssertionError("not enough prompts")


def _engine(served_model, kv_dtype: str, **kw) -> dict:
    # Chunks of 32 tokens: prefill attends over the packed cache chunk after chunk.
    return dict(model=str(served_model), kv_cache_dtype=kv_dtype, enforce_eager=True, max_model_len=MAX_LEN,
                enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=16, seed=0,
                disable_log_stats=False, **kw)


@pytest.fixture(scope="module")
def jobs(served_model, windows, prompts) -> dict[str, dict]:
    tasks = [{"kind": "capacity"}, {"kind": "ppl", "windows": windows},
             {"kind": "greedy", "prompts": prompts, "max_new": 16}]
    return {dt: run_job(_engine(served_model, dt), tasks) for dt in ("auto", "rotkv2", "rotkv4")}


# ---- capacity -------------------------------------------------------------------------------------
def _expected_tokens(served_model, dtype: str) -> int:
    """Tokens the planner must fit in KV_GIB, from first principles (not from the backend's code):
    per layer and block of ``B`` tokens (128, vLLM's CPU default, for auto; the presets' 256 for rotkv), ``B``
    records of
    ``C = sum over K, V of (W * bits / 8 + W / G * z)`` bytes (``z`` = 4 for an fp16 scale + fp16 zero per
    group of ``G``, 2 for e4m3 + uint8), rounded up to even, plus ``S`` sink tokens and the preset's recent
    window's ``R - 1`` ring slots, each ``2 * W * 2`` bytes (bf16 K and V)."""
    from rotkv_vllm.calibration import load_calibration
    from rotkv_vllm.config import DEFAULT_BLOCK_SIZE, KV_CACHE_DTYPES

    cal = load_calibration(served_model)
    cfg, info = cal.config, cal.model_info
    layers, w = info["num_hidden_layers"], info["num_key_value_heads"] * info["head_dim"]
    if dtype == "auto":
        block, page = 128, 128 * 2 * w * 2
    else:
        bits = int(dtype[-1])
        assert not cfg.boosted_layers
        z = {"fp16": 4, "fp8": 2}[cfg.scale_format]
        lay = cal.layout()
        c = w * bits // 8 + w // lay.group_size * z + w * bits // 8 + w // lay.value_group_size * z
        c += c % 2
        sinks = cfg.max_sink_tokens if cfg.sink_mode == "first" else 0
        ring = max(KV_CACHE_DTYPES[dtype].recent_window - 1, 0)
        block = DEFAULT_BLOCK_SIZE
        page = block * c + (sinks + ring) * 2 * w * 2
    return (KV_GIB << 30) // (layers * page) * block


def test_engine_reports_packed_capacity(jobs, served_model):
    cap = {dt: jobs[dt]["capacity"]["kv_cache_size_tokens"] for dt in jobs}
    for dt in jobs:
        assert cap[dt] == _expected_tokens(served_model, dt), (dt, cap[dt])
    r2, r4 = cap["rotkv2"] / cap["auto"], cap["rotkv4"] / cap["auto"]
    print(f"\nKV capacity at {KV_GIB} GiB: auto {cap['auto']:,}, rotkv2 {cap['rotkv2']:,} ({r2:.2f}x), "
          f"rotkv4 {cap['rotkv4']:,} ({r4:.2f}x)")
    assert r2 >= 6.5 and r4 >= 3.5


# ---- accuracy -------------------------------------------------------------------------------------
# Accuracy through vLLM is compared with the transformers reference on a computation that is the same up to
# fp32 rounding: both in fp32 (engine dtype float32; reference weights in fp32), every token of every window
# scored, 8 windows of 256 tokens (2,040 scored tokens). The reference attends over the dequantized records
# of every token, the query's own included, exactly as the backend reads its packed cache, so the engine's
# chunking does not change the maths; what is left is fp32 rounding in another order.
#
# How far that can move perplexity was measured with a perturbation run (the reference with every weight
# multiplied by 1 + 1e-6 * N(0, 1), rounding-sized, 4 seeds): rotkv2 ratios 1.0158, 0.9934, 0.9862, 0.9996.
# A 2-bit code flips where a value sits on a rounding boundary and the flip propagates through later layers,
# so rounding-level differences become ~1.2% (one sigma) of perplexity on 2,040 tokens; fp has no such
# discontinuity (auto: vLLM and reference agreed to 5 digits). Measured through vLLM: auto 1.00000, rotkv2
# 1.0056 (the same in 5 of 5 runs on a busy machine). Bounds: rotkv2 4% (2.5x the largest perturbation
# deviation, ~3.3 sigma), auto 1%. A served calibration without its sink gives 1.25 (test below).
PPL_WINDOWS, PPL_WINDOW = 8, 256
PPL_BOUND = {"auto": 0.01, "rotkv2": 0.04}


@pytest.fixture(scope="module")
def ppl_windows(tokenizer) -> list[list[int]]:
    from rotkv_data import EVAL_TEXT, data_path

    ids = tokenizer(data_path(EVAL_TEXT).read_text(encoding="utf-8")[:60_000], add_special_tokens=False).input_ids
    assert len(ids) >= PPL_WINDOWS * PPL_WINDOW
    return [ids[i * PPL_WINDOW:(i + 1) * PPL_WINDOW] for i in range(PPL_WINDOWS)]


def _vllm_ppl(model_dir, kv_dtype: str, windows) -> float:
    llm = _engine(model_dir, kv_dtype, dtype="float32")
    return run_job(llm, [{"kind": "ppl", "windows": windows}])["ppl"]


@pytest.fixture(scope="module")
def fp32_rotkv2(served_model, ppl_windows, prompts) -> dict[str, dict]:
    """fp32 rotkv2 engines on the fused C++ kernels (the CPU default) and on the PyTorch path
    (``ROTKV_ATTENTION_IMPL``): perplexity of ``ppl_windows`` and 16 greedy tokens of each prompt."""
    tasks = [{"kind": "ppl", "windows": ppl_windows}, {"kind": "greedy", "prompts": prompts, "max_new": 16, "top": 5}]
    llm = _engine(served_model, "rotkv2", dtype="float32")
    return {impl: run_job(llm, tasks, env={"ROTKV_ATTENTION_IMPL": impl}) for impl in ("cpp", "torch")}


@pytest.fixture(scope="module")
def reference_ppl(served_model, ppl_windows) -> dict[str, float]:
    """Teacher-forced perplexity of the transformers reference (fp32) on ``ppl_windows``: fp and rotkv2."""
    from transformers import AutoModelForCausalLM

    from rotkv_vllm.calibration import load_calibration
    from rotkv_vllm.reference import KVMethod, perplexity
    from rotkv_vllm.runtime import effective_config

    model = AutoModelForCausalLM.from_pretrained(served_model, dtype=torch.float32).eval()
    ids = torch.tensor([t for w in ppl_windows for t in w])
    cal = load_calibration(served_model)
    method = KVMethod.from_config(effective_config(cal, "rotkv2"), "rotkv2")
    return {"auto": perplexity(model, ids, window=PPL_WINDOW, method="fp"),
            "rotkv2": perplexity(model, ids, window=PPL_WINDOW, calibration=cal, method=method)}


def test_perplexity_through_vllm_matches_reference(served_model, ppl_windows, reference_ppl, fp32_rotkv2):
    """fp32 engine vs fp32 reference: auto within 1%, rotkv2 (fused C++ kernels) within 4% (bounds derived
    above)."""
    for dt in ("auto", "rotkv2"):
        got = _vllm_ppl(served_model, dt, ppl_windows) if dt == "auto" else fp32_rotkv2["cpp"]["ppl"]
        ratio = got / reference_ppl[dt]
        print(f"\n{dt}: vLLM ppl {got:.4f}, reference {reference_ppl[dt]:.4f}, ratio {ratio:.5f} "
              f"(bound {PPL_BOUND[dt]})")
        assert abs(ratio - 1) < PPL_BOUND[dt]


def test_cpp_kernels_and_pytorch_path_agree_through_the_engine(fp32_rotkv2):
    """The same fp32 engine on the fused C++ kernels and on the PyTorch path. On the same inputs the two write
    identical bytes and attend to within 3e-6 (relative) of the float64 reference, but their attentions sum in
    another fp32 order, and the 2-bit codes turn that 1e-6 noise into discrete differences: a value whose
    value/scale sits within ~1e-6 of a rounding boundary stores the neighbouring code on one path, and the flip
    propagates (derived above: 1e-6 weight noise moved perplexity by up to 1.6%). Asserted: teacher-forced
    perplexity over 2,040 tokens within that 4% band (measured 0.9993 with the recent window, 0.9895 before it),
    and at least half of the greedy continuations identical (measured 7/8 and 6/8). Each divergence is printed
    with both paths' 5 best tokens.

    The one divergence measured with the window (prompt 4 at its 16th token: C++ 4228 at -1.64, PyTorch 29 at
    -1.58) was traced to a single V code: layer 8, position 6, value/scale 0.5000015 (C++) vs 0.4999982
    (PyTorch), stored as code 2 vs 1; every store of both engines' runs was byte-identical between the two
    writers on the same K/V, every attention within 2.9e-6 of the reference, every ring read exact, and setting
    that one byte to the PyTorch path's code in the C++ engine reproduced the PyTorch path's continuations of
    all 8 prompts token for token."""
    cpp, ref = fp32_rotkv2["cpp"], fp32_rotkv2["torch"]
    ratio = cpp["ppl"] / ref["ppl"]
    first, exact, pref = _agreement(ref["greedy"], cpp["greedy"])
    print(f"\nrotkv2 fp32, C++ kernels vs PyTorch path: ppl {cpp['ppl']:.4f} vs {ref['ppl']:.4f} (ratio {ratio:.5f}); "
          f"greedy identical {exact:.2f}, prefix agreement {pref:.2f}")
    for i, (a, b) in enumerate(zip(cpp["greedy"], ref["greedy"])):
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is not None:
            top_a, top_b = dict(map(tuple, cpp["greedy_top"][i][d])), dict(map(tuple, ref["greedy_top"][i][d]))
            print(f"prompt {i}: diverges at token {d}: C++ {top_a}, PyTorch {top_b}")
    assert abs(ratio - 1) < PPL_BOUND["rotkv2"]
    assert exact >= 0.5


def _broken_copy(served_model, dest, *, identity_order: bool = False, no_sinks: bool = False):
    """A serving folder with the same weights and a deliberately damaged calibration."""
    import dataclasses

    from rotkv_vllm.calibration import CONFIG_FILE, TENSORS_FILE, load_calibration, save_calibration

    dest.mkdir()
    for f in served_model.iterdir():
        if f.name not in (CONFIG_FILE, TENSORS_FILE) and not f.name.startswith("."):
            (dest / f.name).symlink_to(f.resolve())
    cal = load_calibration(served_model)
    if identity_order:
        cal = dataclasses.replace(cal, key_orders=[torch.arange(o.numel()) for o in cal.key_orders])
    if no_sinks:
        cal = dataclasses.replace(cal, config=dataclasses.replace(cal.config, sink_mode="none"))
    save_calibration(cal, dest)
    return dest


def test_perplexity_bound_catches_a_broken_path(served_model, ppl_windows, reference_ppl, tmp_path):
    """The same comparison fails when the served path drops the attention sink (measured 1.25): the test above
    can fail, and a broken path lands far outside its bound. (Serving with the identity channel order instead
    of the calibrated one measured 0.958 here: with centered keys the order moves SmolLM2's perplexity by less
    than the 2-bit noise band at this length, so it is not used as the broken case.)"""
    broken = _broken_copy(served_model, tmp_path / "no_sinks", no_sinks=True)
    ratio = _vllm_ppl(broken, "rotkv2", ppl_windows) / reference_ppl["rotkv2"]
    print(f"\nrotkv2 served without its sink: vLLM / intact reference = {ratio:.4f}")
    assert abs(ratio - 1) > 3 * PPL_BOUND["rotkv2"]


def test_fewer_bits_are_not_better(jobs):
    """bf16 engines: fewer bits cannot beat more bits by more than noise (gaps measured: 1.02x and 1.5x)."""
    assert jobs["auto"]["ppl"] <= jobs["rotkv4"]["ppl"] * 1.02 <= jobs["rotkv2"]["ppl"] * 1.04


def _agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float, float]:
    first = sum(a[0] == b[0] for a, b in zip(ref, got)) / len(ref)
    exact = sum(a == b for a, b in zip(ref, got)) / len(ref)
    pref = []
    for a, b in zip(ref, got):
        pref.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a))
    return first, exact, sum(pref) / len(pref)


def test_greedy_agreement_with_auto(jobs):
    rows = {dt: _agreement(jobs["auto"]["greedy"], jobs[dt]["greedy"]) for dt in ("rotkv2", "rotkv4")}
    for dt, (first, exact, pref) in rows.items():
        print(f"\n{dt} vs auto: first token {first:.2f}, exact {exact:.2f}, prefix agreement {pref:.2f}")
    assert rows["rotkv4"][0] >= 0.5  # 4 bits keeps most next-token argmaxes of a 48-token prompt
    assert rows["rotkv4"][2] >= rows["rotkv2"][2]


# ---- prefix caching and preemption ----------------------------------------------------------------
def test_prefix_caching_and_preemption(served_model, windows, prompts):
    """fp32 engines, 256-token blocks. (1) A 600-token prompt served twice reuses two cached blocks and
    continues identically. (2) Four 232-token requests generating 48 tokens each need 2 blocks; with 4
    usable blocks (5 minus vLLM's null block) they preempt each other and are recomputed. Against the same
    batch in a large cache: identical before the first preemption (same schedule, same arithmetic); after
    it, recomputation runs other matrix shapes, whose fp32 noise can flip a 2-bit code and change the greedy
    path, so the check is that recomputed requests stay as confident as without preemption (wrong blocks or
    stale sinks after recomputation would drop their logprobs by nats)."""
    prompt = [t for w in windows for t in w][:600]
    assert len(prompt) == 600
    batch = [(p * 5)[:232] for p in prompts[:4]]  # 232 + 48 = 280 tokens > one 256-token block
    base = _engine(served_model, "rotkv2", dtype="float32", enable_prefix_caching=True)
    base.update(max_num_batched_tokens=256, max_model_len=1024, block_size=256)
    big = run_job(base, [{"kind": "batched", "prompts": batch, "max_new": 48},
                         {"kind": "prefix_repeat", "prompt": prompt, "max_new": 8}])
    small = run_job(dict(base, num_gpu_blocks_override=5), [{"kind": "batched", "prompts": batch, "max_new": 48}])

    assert big["hits_warm"] >= 512 and big["hits_cold"] == 0
    assert big["warm"] == big["cold"]
    assert max(abs(a - b) for a, b in zip(big["warm_logprobs"], big["cold_logprobs"])) < 1e-3

    assert big["preemptions"] == 0 and small["preemptions"] >= 1
    # The leading request needs its second block after 256 - 232 = 24 generated tokens; requests admitted
    # later trail it by the few steps their prefill chunks took, so the first 16 tokens precede any preemption.
    safe = 16
    for a, la, b, lb in zip(big["batched"], big["batched_logprobs"], small["batched"], small["batched_logprobs"]):
        assert len(b) == 48
        assert a[:safe] == b[:safe]
        assert max(abs(x - y) for x, y in zip(la[:safe], lb[:safe])) < 1e-4
        after_big, after_small = la[safe:], lb[safe:]
        mean_big, mean_small = sum(after_big) / len(after_big), sum(after_small) / len(after_small)
        print(f"\nmean logprob after the preemption point: {mean_small:.3f} (preempted run) vs {mean_big:.3f}")
        assert mean_small > mean_big - 0.5


# ---- tensor parallelism ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tp_model(tmp_path_factory, tokenizer):
    """A random 2-layer Llama whose 4 KV heads split over 2 ranks, calibrated for tensor parallel size 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rotkv_data import data_path
    from rotkv_vllm.calibration import calibrate, save_calibration
    from rotkv_vllm.demo import serving_config

    out = tmp_path_factory.mktemp("tiny_tp")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    text = data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")[:50_000]
    cal = calibrate(model, tokenizer, serving_config(2), text=text, num_sequences=4, seq_len=128, tp_size=2,
                    progress=False)
    assert cal.head_group_size <= 2  # a group never straddles the two ranks
    save_calibration(cal, out)
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel size 2 needs two CPU cores")
def test_tensor_parallel_two_ranks_match_one(tiny_tp_model, prompts):
    base = dict(model=str(tiny_tp_model), kv_cache_dtype="rotkv2", enforce_eager=True, max_model_len=512,
                dtype="float32", seed=0)
    tasks = [{"kind": "greedy", "prompts": prompts[:4], "max_new": 16}]
    one = run_job(dict(base, tensor_parallel_size=1), tasks)
    # vLLM's CPU workers bind OpenMP threads per rank; with one NUMA node they must be given explicitly.
    two = run_job(dict(base, tensor_parallel_size=2), tasks, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert one["greedy"] == two["greedy"]
    for a, b in zip(one["greedy_logprobs"], two["greedy_logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


# ---- start-up errors ------------------------------------------------------------------------------
def test_uncalibrated_model_refused_at_startup(tiny_tp_model, tmp_path):
    from rotkv_vllm.demo import VllmServer

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_tp_model.iterdir():
        if not f.name.startswith("rotkv"):
            (bare / f.name).symlink_to(f)
    srv = VllmServer(bare, kv_cache_dtype="rotkv2", max_model_len=512, startup_timeout=600)
    with pytest.raises(RuntimeError, match="exited"):
        srv.start()
    log = srv.log_path.read_text(errors="replace")
    assert "no RotateKV calibration" in log and "python -m rotkv_vllm.calibration" in log
    assert not srv.leftover


# ---- the OpenAI server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(served_model):
    from rotkv_vllm.demo import VllmServer

    srv = VllmServer(served_model, kv_cache_dtype="rotkv2", kv_cache_space_gib=KV_GIB, max_model_len=MAX_LEN)
    srv.start()
    yield srv
    srv.stop()


def test_server_completion_and_chat(server):
    comp = server.complete("The capital of France is", max_tokens=12, ignore_eos=True)
    assert comp["usage"]["completion_tokens"] == 12 and comp["choices"][0]["text"].strip()
    chat = server.chat("Name a color.", max_tokens=12)
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["message"]["content"].strip()
    info = server.cache_info()
    assert info["cache_dtype"] == "rotkv2" and int(info["kv_cache_size_tokens"]) > 0


def test_server_32_concurrent_requests(server, prompts):
    texts = [f"Request {i}: the number after {i} is" for i in range(32)]
    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda t: server.complete(t, max_tokens=8, ignore_eos=True), texts))
    assert len(outs) == 32
    assert all(o["usage"]["completion_tokens"] == 8 for o in outs)


def test_server_stops_cleanly(server):
    code = server.stop()
    assert code == 0, server.log_tail()
    assert not server.leftover  # engine core and worker exited with the server
