"""`optimum-cli rotkv halo-export` end to end on a tiny HALO fine-tune, against the loopback Hub server: command ->
push to a branch, which fails at the commit (server error) -> nothing committed, output intact -> `optimum-cli rotkv
push` retries it -> empty cache -> load by repo id and revision -> identical outputs to the local folder; and the
Python face (HALOQuantizer) exporting a PEFT LoRA fine-tune merged to bf16, loaded back with plain
``AutoModelForCausalLM.from_pretrained(REPO_ID)``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hub_helpers import READ, TOKENS, WRITE, HubServer, folder_digest, hub_env, point_hub_at, run_cli, run_worker

pytestmark = pytest.mark.slow

REPO = "alice/halo-w8a8"


def _tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rotkv_vllm.bundled_model import ensure_smollm2

    return AutoTokenizer.from_pretrained(ensure_smollm2())


@pytest.fixture(scope="module")
def halo_checkpoint(tokenizer, tmp_path_factory):
    """A tiny Llama fine-tuned for 3 steps with HALO level 1 (INT8, full Hadamard), saved like a Trainer would."""
    from optimum_plugin.halo import HALOConfig, apply_halo
    from rotkv_data import data_path

    model = _tiny_llama(tokenizer)
    cfg = HALOConfig(level=1)
    apply_halo(model, cfg)
    text = data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("halo") / "finetuned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "halo_config.json").write_text(cfg.to_json())
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-server"), TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def failed_push(hub, halo_checkpoint, tmp_path_factory):
    """The command with a server error injected at the commit (and no retries): it must fail cleanly."""
    root = tmp_path_factory.mktemp("cli-halo")
    out = root / "out"
    env = hub_env(hub, root / "hf_home")
    hub.inject("commit", times=1)
    p = run_cli(["rotkv", "halo-export", "-m", halo_checkpoint, out, "--eval-tokens", "256", "--eval-window", "128",
                 "--push-to-hub", REPO, "--revision", "v1", "--token", WRITE, "--retries", "0", "--no-progress"],
                env=env)
    return out, p, env, folder_digest(out) if out.exists() else {}, {b: c for b, c in
                                                                      hub.repos[("model", REPO)].branches.items()}


@pytest.fixture(scope="module")
def pushed(hub, failed_push):
    """The retry: `optimum-cli rotkv push OUT REPO --revision v1` uploads the finished folder as it is."""
    out, _, env, _, _ = failed_push
    p = run_cli(["rotkv", "push", out, REPO, "--revision", "v1", "--token", WRITE, "--no-progress"], env=env)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return out, p


def test_failed_upload_commits_nothing_keeps_the_output_and_says_how_to_retry(failed_push, pushed):
    out, p, _, digest, branches = failed_push
    assert p.returncode == 1, p.stderr[-3000:]
    assert "optimum-cli rotkv halo-export: error: pushing" in p.stderr and "Nothing was committed" in p.stderr
    assert f"optimum-cli rotkv push {out} {REPO} --revision v1" in p.stderr and "Traceback" not in p.stderr
    # The branch was created from main before the commit failed; both still point at the initial commit.
    assert set(branches) == {"main", "v1"} and branches["main"] == branches["v1"]
    assert {"model.safetensors", "config.json", "README.md"} <= set(digest)
    assert folder_digest(out) == digest  # neither the failure nor the retry touched the folder
    assert "== optimum-cli rotkv push: done" in pushed[1].stdout


def test_command_exports_w8a8_with_card_to_a_branch(pushed, failed_push, hub):
    from huggingface_hub import ModelCard

    out = failed_push[0]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    text = (out / "README.md").read_text()
    card = ModelCard(text).data.to_dict()
    assert card["library_name"] == "transformers" and {"rotkv", "halo", "int8"} <= set(card["tags"])
    assert f"vllm serve {REPO}" in text and f'load_halo("{REPO}")' in text
    assert '"level": 1' in text  # the training recipe, read from halo_config.json
    # W8A8 with per-channel weight and per-token activation scales perturbs the logits by ~1 %, which moves the
    # perplexity of this model (NLL ~ ln(49152) ~ 10.8) by far less than 5 %.
    row = re.search(r"\| perplexity[^|]*\|[^|]*\| ([\d.e+]+) \(source, float32\) \| ([\d.e+]+) \| ([\d.]+) \|", text)
    assert row is not None, text
    assert abs(float(row.group(3)) - 1) < 0.05
    # Pushed to branch v1 only: main still holds just the repo's initial commit.
    assert set(hub.files(REPO)) == {".gitattributes"}
    remote = hub.files(REPO, revision="v1")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == {k: (out / k).read_bytes()
                                                                          for k in folder_digest(out)}
    assert re.search(rf"pushed +{re.escape(hub.url)}/{REPO} @ v1: commit", pushed[1].stdout)
    assert len(hub.repos[("model", REPO)].commits) == 2  # the initial commit and the retried push, nothing else


def test_load_by_repo_id_and_revision_with_an_empty_cache_matches_the_local_folder(pushed, hub, tmp_path):
    out, _ = pushed
    res = run_worker(["halo", out, REPO, "--revision", "v1"], env=hub_env(hub, tmp_path / "hf_home"))
    assert res["identical"] and res["finite"], res
    assert res["w8a8_layers"] == [14, 14]  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays bf16


def test_python_face_merges_a_lora_fine_tune_to_bf16_and_from_pretrained_loads_it(tokenizer, tmp_path,
                                                                                    monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from optimum_plugin.quantizers import HALOQuantizer

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    _tiny_llama(tokenizer).save_pretrained(base_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()

    q = HALOQuantizer.from_pretrained(adapter_dir)
    q.quantize(out, export_format="bf16", evaluate=False)
    with HubServer(tmp_path / "server", TOKENS) as hub:
        point_hub_at(monkeypatch, hub, tmp_path / "hf_home")
        res = q.push_to_hub("alice/halo-bf16", token=WRITE, private=True, progress=False)
        assert res.private is True
        remote = AutoModelForCausalLM.from_pretrained("alice/halo-bf16", token=READ)
    local = AutoModelForCausalLM.from_pretrained(out)
    assert remote.dtype == local.dtype == torch.bfloat16
    sd_r, sd_l = remote.state_dict(), local.state_dict()
    assert sd_r.keys() == sd_l.keys() and all(torch.equal(sd_r[k], sd_l[k]) for k in sd_r)
    # The LoRA update is merged (and only rounded to bf16).
    w = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(sd_r["model.layers.0.self_attn.q_proj.weight"], w.to(torch.bfloat16))
    ids = torch.arange(5, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, local(ids).logits)
    assert "AutoModelForCausalLM.from_pretrained(\"alice/halo-bf16\")" in hub.files("alice/halo-bf16")[
        "README.md"].decode()
