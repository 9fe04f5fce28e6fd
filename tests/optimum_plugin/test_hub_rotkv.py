"""RotateKV through the Hub, in process: RotateKVQuantizer (the Python face of `optimum-cli rotkv rotatekv`) on a tiny
random Llama, push, then ``find_calibration`` / ``load_rotkv`` by repo id through a real HTTP server: only the
calibration files are fetched, revisions pin them, HF_HUB_OFFLINE reads the cache, errors name the cause."""

from __future__ import annotations

import json

import pytest
import torch
from hub_helpers import READ, TOKENS, WRITE, HubServer, folder_digest, point_hub_at

from optimum_plugin.quantizers import RotateKVQuantizer, load_rotkv
from rotkv_vllm.calibration import CONFIG_FILE, TENSORS_FILE, find_calibration, load_calibration
from rotkv_vllm.config import RotateKVConfig

REPO = "alice/tiny-rotkv"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama (2 KV heads of 32) saved with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rotkv_vllm.bundled_model import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_text():
    from rotkv_data import data_path

    return data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")[:60_000]


def _quantize(src, out, text, **kw):
    q = RotateKVQuantizer.from_pretrained(src)
    q.quantize(out, calib_text=text, num_sequences=2, seq_len=64, eval_tokens=256, eval_window=128,
               progress=False, **kw)
    return q


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(tmp_path / "server", TOKENS) as server:
        point_hub_at(monkeypatch, server, tmp_path / "hf_home")
        yield server


def test_quantizer_folder_card_and_push(hub, tiny_model_dir, calib_text, tmp_path):
    out = tmp_path / "out"
    q = _quantize(tiny_model_dir, out, calib_text)
    names = {p.name for p in out.iterdir()}
    assert {CONFIG_FILE, TENSORS_FILE, "README.md", "config.json", "model.safetensors", "tokenizer.json"} <= names
    # The weights are copied byte for byte; the calibration is the default servable one.
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    from rotkv_vllm.demo import serving_config

    cal = load_calibration(out)
    assert cal.config == serving_config(2) and cal.config.sink_mode != "topk"  # what the vLLM backend serves
    # The card: measured perplexities (a 2-bit cache cannot beat full precision on average by much), the KV size.
    ev = q.card_spec.evaluation[0]
    assert 1.0 < ev["reference"] and 0.9 * ev["reference"] < ev["quantized"] < 20 * ev["reference"]
    size = q.card_spec.sizes[0]
    # 2 layers x K+V x 64 channels x 2 bytes in bf16 = 512 B; rotkv2: 2 bits + one fp16 scale/zero per group.
    assert size["bf16_bytes"] == 2 * 2 * 64 * 2 and size["quantized_bytes"] < size["bf16_bytes"] / 5
    local_card = (out / "README.md").read_text()
    assert f"vllm serve {out} --kv-cache-dtype rotkv2" in local_card
    before = folder_digest(out)
    res = q.push_to_hub(REPO, token=WRITE, progress=False)
    pushed = hub.files(REPO)
    assert pushed["README.md"].decode().count(f"vllm serve {REPO} --kv-cache-dtype rotkv2") == 1
    assert {k: v for k, v in pushed.items() if k not in ("README.md", ".gitattributes")} == {
        k: (out / k).read_bytes() for k in before if k != "README.md"}
    assert folder_digest(out) == before and res.commit_oid == hub.head(REPO)


def test_find_calibration_by_repo_id_fetches_only_the_calibration(hub, tiny_model_dir, calib_text, tmp_path):
    out = tmp_path / "out"
    _quantize(tiny_model_dir, out, calib_text, evaluate=False).push_to_hub(REPO, token=WRITE, progress=False)
    n = len(hub.log)
    folder = find_calibration(REPO)
    got = [p for m, p, s in hub.log[n:] if "/resolve/" in p and m == "GET"]
    assert sorted(p.rsplit("/", 1)[1] for p in got) == sorted([CONFIG_FILE, TENSORS_FILE])
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, TENSORS_FILE])
    a, b = load_calibration(out), load_calibration(folder)
    assert a.config == b.config and all(torch.equal(x, y) for x, y in zip(a.key_orders, b.key_orders))
    # A second call is answered from the cache snapshot of the same commit (one revision lookup, no download).
    n = len(hub.log)
    assert find_calibration(REPO) == folder
    assert not [p for m, p, s in hub.log[n:] if "/resolve/" in p and m == "GET"]


def test_load_by_repo_id_matches_the_local_folder(hub, tiny_model_dir, calib_text, tmp_path):
    from rotkv_vllm.hf_cache import rotkv_cache

    out = tmp_path / "out"
    _quantize(tiny_model_dir, out, calib_text, evaluate=False).push_to_hub(REPO, token=WRITE, private=True,
                                                                           progress=False)
    with pytest.raises(ValueError, match="does not exist or is private"):
        load_rotkv(REPO)  # private, and no token (checked on an empty cache: a cached snapshot would be used)
    logits = []
    for src, token in ((out, None), (REPO, READ)):
        model, tok, cal = load_rotkv(src, token=token)
        ids = tok("The tower is 324 metres tall, about the same height", return_tensors="pt").input_ids
        with torch.no_grad(), rotkv_cache(model, cal) as cache:
            logits.append(model(ids, past_key_values=cache, use_cache=True).logits)
    assert torch.equal(logits[0], logits[1])


def test_revisions_pin_the_calibration(hub, tiny_model_dir, calib_text, tmp_path):
    q2 = _quantize(tiny_model_dir, tmp_path / "b2", calib_text, evaluate=False)
    q2.push_to_hub(REPO, token=WRITE, progress=False)
    q4 = _quantize(tiny_model_dir, tmp_path / "b4", calib_text, evaluate=False,
                   config=RotateKVConfig.for_bits(4, sink_mode="first"))
    q4.push_to_hub(REPO, token=WRITE, revision="rotkv4", progress=False)
    main_commit = hub.head(REPO)
    assert load_calibration(find_calibration(REPO)).config.key_bits == 2
    assert load_calibration(find_calibration(REPO, "rotkv4")).config.key_bits == 4
    assert load_calibration(find_calibration(REPO, main_commit)).config.key_bits == 2
    with pytest.raises(ValueError, match="has no revision 'v9'"):
        find_calibration(REPO, "v9")


def test_offline_missing_and_uncalibrated_repos(hub, tiny_model_dir, calib_text, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from optimum_plugin.hub import push_to_hub

    _quantize(tiny_model_dir, tmp_path / "out", calib_text, evaluate=False).push_to_hub(REPO, token=WRITE,
                                                                                         progress=False)
    push_to_hub(tiny_model_dir, "alice/plain", token=WRITE, progress=False)  # a model without calibration
    assert find_calibration("alice/plain") is None
    with pytest.raises(ValueError, match="does not exist or is private"):
        find_calibration("alice/nothing-here")
    assert find_calibration(str(tmp_path / "not" / "there")) is None  # an absolute path is never a repo id
    cached = find_calibration(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.log)
    assert find_calibration(REPO) == cached
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        find_calibration("alice/plain")  # never downloaded: nothing in the cache
    assert len(hub.log) == n


def test_output_folder_rules(tiny_model_dir, calib_text, tmp_path):
    q = RotateKVQuantizer.from_pretrained(tiny_model_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        q.quantize(busy, calib_text=calib_text, num_sequences=1, seq_len=64, evaluate=False)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is the source model folder"):
        q.quantize(tiny_model_dir, calib_text=calib_text, overwrite=True, evaluate=False)
    with pytest.raises(ValueError, match="nothing to push yet"):
        q.push_to_hub(REPO, token=WRITE)
    with pytest.raises(ValueError, match="file_name is not used"):
        RotateKVQuantizer.from_pretrained(tiny_model_dir, "model.safetensors")
    assert json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"] == 2
