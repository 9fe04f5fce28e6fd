"""`optimum-cli rotkv lrq-dit` end to end on a tiny random DiTPipeline, against the loopback Hub server:
command -> push -> empty cache -> `DiffusionPipeline.from_pretrained(REPO_ID)` -> identical images to the local
folder, with the transformer still packed (LRQLinear) after loading."""

from __future__ import annotations

import re

import pytest
import torch
from hub_helpers import TOKENS, WRITE, HubServer, folder_digest, hub_env, run_cli, run_worker

pytestmark = pytest.mark.slow

REPO = "alice/dit-lrq-w4a8"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-server"), TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A tiny class-conditional DiTPipeline (2 blocks of width 64, 8x8 latents), saved."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    DiTPipeline(transformer=dit.eval(), vae=vae.eval(), scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pushed(hub, dit_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-lrq")
    out = root / "out"
    before = folder_digest(dit_dir)
    p = run_cli(["rotkv", "lrq-dit", "-m", dit_dir, out, "--prompts", "0,1,2,3", "--num-inference-steps", "3",
                 "--batch-size", "2", "--guidance-scale", "2.0", "--modules-to-not-convert", "proj_out_2",
                 "--base-model", "facebook/DiT-XL-2-256", "--push-to-hub", REPO, "--token", WRITE, "--no-progress"],
                env=hub_env(hub, root / "hf_home"))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    assert folder_digest(dit_dir) == before
    return out, p


def test_command_writes_a_packed_pipeline_and_card(pushed, hub):
    import json

    from huggingface_hub import ModelCard

    out, p = pushed
    qc = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lrq_dit" and qc["weight_bits"] == 4 and qc["act_bits"] == 8
    assert len(qc["layers"]) == 2 * 9 + 1 and "proj_out_2" not in qc["layers"]
    text = (out / "README.md").read_text()
    card = ModelCard(text).data.to_dict()
    assert card["library_name"] == "diffusers" and card["base_model"] == "facebook/DiT-XL-2-256"
    assert {"rotkv", "lrq-dit"} <= set(card["tags"])
    assert f'DiffusionPipeline.from_pretrained("{REPO}")' in text and "import optimum_plugin.lrq_dit" in text
    # Samples of the quantized pipeline against the float pipeline's, same seeds: W4A8 on a random DiT stays
    # within a few percent (test_lrq_dit_save_load bounds the transformer's output error by 25 %).
    psnr = float(re.search(r"PSNR of samples[^|]*\|[^|]*\| float pipeline \| ([\d.]+) \|", text).group(1))
    rel = float(re.search(r"relative L2 distance[^|]*\|[^|]*\| float pipeline \| ([\d.e-]+) \|", text).group(1))
    assert 0 < rel < 0.25 and psnr > 15
    # Packed linear layers: 4-bit codes (1/4 of bf16) + 10 bytes of row parameters per 64-wide row (+0.08) +
    # an fp16 smoothing vector (2 bytes per input, ~+0.02 for 64x64): about 1/0.35, so at least 2.5x smaller.
    ratio = float(re.search(r"- the 19 quantized linear layers[^:]*: .*\(([\d.]+)x smaller\)", text).group(1))
    assert ratio > 2.5
    assert "== optimum-cli rotkv lrq-dit: done" in p.stdout and "pushed" in p.stdout
    remote = hub.files(REPO)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == {k: (out / k).read_bytes()
                                                                          for k in folder_digest(out)}


def test_from_pretrained_by_repo_id_with_an_empty_cache_matches_the_local_folder(pushed, hub, tmp_path):
    out, _ = pushed
    res = run_worker(["lrq", out, REPO], env=hub_env(hub, tmp_path / "hf_home"))
    assert res["identical"] and res["finite"], res
    assert res["lrq_linear_layers"] == [19, 19]
    assert any(f.startswith("models--alice--dit-lrq-w4a8/snapshots/") and f.endswith(
        "transformer/diffusion_pytorch_model.safetensors") for f in res["cache_files"])
