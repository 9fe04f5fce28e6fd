"""`optimum-cli rotkv rotatekv` end to end on the bundled SmolLM2-135M-Instruct, against the loopback Hub server:
command -> push (private) -> empty cache -> load by repo id -> identical outputs to the local folder; a wrong token
fails before any work; and (e2e) `vllm serve REPO_ID --kv-cache-dtype rotkv2` through the server answers."""

from __future__ import annotations

import re

import pytest
from hub_helpers import READ, TOKENS, WRITE, HubServer, folder_digest, hub_env, run_cli, run_worker

pytestmark = pytest.mark.slow

REPO = "alice/smollm2-rotkv2"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-server"), TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def smollm2_dir():
    from rotkv_vllm.bundled_model import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="module")
def pushed(hub, smollm2_dir, tmp_path_factory):
    """The command, run once: calibrate on 2 x 128 tokens, evaluate on 256, push to a private repo."""
    from rotkv_data import data_path

    root = tmp_path_factory.mktemp("cli-rotkv")
    out = root / "out"
    source_before = folder_digest(smollm2_dir)
    p = run_cli(["rotkv", "rotatekv", "-m", smollm2_dir, out, "--calib-file",
                 data_path("calib_wikitext2_valid.txt"), "--num-sequences", "2", "--seq-len", "128",
                 "--eval-tokens", "256", "--eval-window", "128", "--push-to-hub", REPO, "--private",
                 "--token", WRITE, "--no-progress"], env=hub_env(hub, root / "hf_home"))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    assert folder_digest(smollm2_dir) == source_before  # the source is only read
    return out, p


def test_command_writes_the_folder_and_card_and_pushes_it(pushed, smollm2_dir, hub):
    from huggingface_hub import ModelCard

    out, p = pushed
    names = {q.name for q in out.iterdir()}
    assert {"rotkv_config.json", "rotkv.safetensors", "README.md", "config.json", "model.safetensors",
            "tokenizer.json"} <= names
    assert (out / "model.safetensors").read_bytes() == (smollm2_dir / "model.safetensors").read_bytes()
    card_text = (out / "README.md").read_text()
    card = ModelCard(card_text).data.to_dict()
    assert card["library_name"] == "transformers" and {"rotkv", "rotatekv", "rotkv2"} <= set(card["tags"])
    assert "base_model" not in card  # a local source has no Hub id to name
    assert f"vllm serve {REPO} --kv-cache-dtype rotkv2" in card_text
    assert WRITE not in card_text and "--token $HF_TOKEN" in card_text
    # KV bytes per token, derived by hand: 30 layers x (K + V) x 192 channels (3 KV heads x 64) in one quantization
    # group: 192 x 2 bits = 48 bytes + fp16 scale + fp16 zero = 52 bytes, against 192 x 2 bytes in bf16.
    assert "3.05 KiB against 22.50 KiB in bf16 (7.38x smaller)" in card_text  # 3120 B vs 23040 B
    # The evaluation printed in the summary is the one in the card (same run, same numbers).
    m = re.search(r"evaluation +perplexity.*?: ([\d.e+]+) \[full-precision KV\] -> ([\d.e+]+)", p.stdout)
    assert m is not None, p.stdout
    ref, q = float(m.group(1)), float(m.group(2))
    assert 1 < ref < q * 1.05  # a 2-bit cache does not improve on full precision beyond noise
    row = re.search(r"\| perplexity[^|]*\|[^|]*\| ([\d.e+]+) \(full-precision KV\) \| ([\d.e+]+) \|", card_text)
    assert row is not None and abs(float(row.group(1)) - ref) <= 1e-3 * ref
    assert "== optimum-cli rotkv rotatekv: done" in p.stdout
    assert re.search(rf"pushed +{re.escape(hub.url)}/{REPO} @ main: commit [0-9a-f]{{12}} .*private", p.stdout)
    # What the repo holds is the folder, byte for byte, in one commit after the initial one.
    remote = hub.files(REPO)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == {k: (out / k).read_bytes()
                                                                          for k in folder_digest(out)}
    assert len(hub.repos[("model", REPO)].commits) == 2


def test_load_by_repo_id_with_an_empty_cache_matches_the_local_folder(pushed, hub, tmp_path):
    out, _ = pushed
    res = run_worker(["rotkv", out, REPO], env=hub_env(hub, tmp_path / "hf_home", token=READ))
    assert res["identical"] and res["calibration_identical"] and res["finite"], res
    cached = [f for f in res["cache_files"] if f.startswith("models--alice--smollm2-rotkv2/snapshots/")]
    assert {f.rsplit("/", 1)[1] for f in cached} >= {"rotkv_config.json", "rotkv.safetensors", "model.safetensors"}


def test_wrong_token_fails_before_any_work(hub, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    p = run_cli(["rotkv", "rotatekv", "-m", smollm2_dir, out, "--calib-file", smollm2_dir / "config.json",
                 "--push-to-hub", REPO, "--token", "hf_wrong"], env=hub_env(hub, tmp_path / "hf_home"), timeout=300)
    assert p.returncode == 1
    assert "optimum-cli rotkv rotatekv: error: the Hub at" in p.stderr and "rejected the token" in p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


@pytest.mark.e2e
def test_vllm_serve_repo_id_through_the_hub_server(pushed, hub, tmp_path):
    from rotkv_vllm.demo import VllmServer

    n = len(hub.log)
    env = hub_env(hub, tmp_path / "hf_home", token=READ)
    with VllmServer(REPO, kv_cache_dtype="rotkv2", kv_cache_space_gib=1, max_model_len=512, env=env,
                    log_path=tmp_path / "vllm.log", startup_timeout=600) as srv:
        out = srv.complete("The capital of France is", max_tokens=8)
        info = srv.cache_info()
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] >= 1 and text.strip(), out
    assert info["cache_dtype"] == "rotkv2"
    # The calibration came from the server by repo id (vLLM itself fetches weights and configs, not rotkv_config.json).
    fetched = [path for method, path, status in hub.log[n:] if method == "GET" and status == 200]
    assert any(path.endswith("/rotkv_config.json") for path in fetched)
    assert any(path.endswith("/model.safetensors") for path in fetched)
    assert srv.exit_code is not None
