"""LRQ-DiT end to end on small random diffusers/transformers models: calibrate through a real pipeline,
quantize, save_pretrained, from_pretrained (packed), bit-exact outputs, on-disk size, and the clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import optimum_plugin.lrq_dit as lrq
from optimum_plugin.lrq_dit.modules import LRQLinear
from rotkv_kernels.twin_log import twin_log_packed_width
from rotkv_kernels.twin_log_triton import triton_runnable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_dit_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    # eval(): in train mode DiT's label embedding drops class labels at random (classifier-free guidance training).
    pipe = DiTPipeline(transformer=dit.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _probe(model):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(3, 4, 8, 8, generator=g).to(model.dtype)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([10, 500, 990]), class_labels=torch.tensor([1, 7, 1000])).sample


def _generate(pipe):
    out = pipe(class_labels=[3, 5], num_inference_steps=3, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


@pytest.fixture(scope="module")
def quantized_dit(tmp_path_factory):
    """A tiny DiTPipeline quantized W4A8 with LRQ-DiT (calibrated through the pipeline) and saved."""
    pipe = _tiny_dit_pipeline()
    ref = _probe(pipe.transformer)
    cfg = lrq.LRQDiTConfig(weight_bits=4, act_bits=8, modules_to_not_convert=("proj_out_2",),
                           eta_grid=(0.01, 0.1, 1.0), clip_lower_grid=(0.0,), clip_upper_grid=(1.0, 0.98))
    resolved = lrq.quantize_pipeline(pipe, cfg, prompts=[0, 1, 2, 3], num_inference_steps=3, batch_size=2,
                                     progress=False, guidance_scale=2.0)
    out = _probe(pipe.transformer)
    images = _generate(pipe)
    folder = tmp_path_factory.mktemp("lrq") / "dit"
    pipe.save_pretrained(folder)
    return pipe, resolved, ref, out, images, folder


def test_calibrated_plan_covers_every_converted_linear(quantized_dit):
    pipe, resolved, *_ = quantized_dit
    tr = pipe.transformer
    converted = {n for n, m in tr.named_modules() if isinstance(m, LRQLinear)}
    assert converted == set(resolved.layers)
    assert "proj_out_2" not in converted and isinstance(tr.proj_out_2, nn.Linear)
    assert len(converted) == 2 * 9 + 1  # per block: 4 attention, 2 MLP, adaLN + 2 timestep MLP; and proj_out_1
    assert all(p.smooth and p.shift for p in resolved.layers.values())
    # auto: most layers rotate; those where rotating would not lower the activation error stay unrotated
    rotated = [n for n, p in resolved.layers.items() if p.rotation != "none"]
    assert len(rotated) >= len(converted) // 2


def test_quantized_model_stays_close_to_float(quantized_dit):
    _, _, ref, out, *_ = quantized_dit
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.25


def test_checkpoint_holds_packed_codes_and_config(quantized_dit):
    from safetensors import safe_open

    pipe, resolved, _, _, _, folder = quantized_dit
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lrq_dit"
    assert lrq.LRQDiTConfig.from_dict(qc) == resolved
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        k = "transformer_blocks.0.attn1.to_q"
        packed = f.get_tensor(f"{k}.weight")
        params = f.get_tensor(f"{k}.weight_params")
    assert f"{k}.weight_packed" not in keys  # the codes live under the float weight's name (modules.py)
    assert packed.dtype == torch.uint8 and packed.shape == (64, twin_log_packed_width(64, 4))
    assert params.dtype == torch.int16 and params.shape == (64, 5)


def test_on_disk_size_of_quantized_layers_vs_bf16(quantized_dit):
    """Packed 4-bit codes + 10 bytes of row parameters + the smoothing vector, against 2 bytes per bf16 weight."""
    from safetensors import safe_open

    pipe, resolved, _, _, _, folder = quantized_dit
    q_bytes = bf16_bytes = 0
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for name, plan in resolved.layers.items():
            m = pipe.transformer.get_submodule(name)
            for key in f.keys():
                if key.startswith(name + ".") and not key.endswith(".bias"):
                    t = f.get_tensor(key)
                    q_bytes += t.numel() * t.element_size()
            bf16_bytes += 2 * m.in_features * m.out_features
            bound = m.out_features * (m.in_features // 2 + 10) + 2 * m.in_features * (plan.smooth + plan.shift)
            if plan.rotation == "outlier_aware":
                k = m.in_features // plan.block_size
                bound += 4 * m.in_features + 2 * k * plan.greedy_steps * (2 + (plan.block_size + 7) // 8)
            assert m.storage_bytes() - (0 if m.bias is None else 4 * m.out_features) <= bound
    assert q_bytes < 0.4 * bf16_bytes  # 4/16 of the weights plus overhead on 64-wide rows


def test_from_pretrained_loads_packed_and_is_bit_exact(quantized_dit):
    from diffusers import DiTPipeline

    pipe, resolved, _, out, images, folder = quantized_dit
    loaded = DiTPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    tr = loaded.transformer
    assert tr.is_quantized and tr.config.quantization_config.lrq_config == resolved
    mods = {n: m for n, m in tr.named_modules() if isinstance(m, LRQLinear)}
    assert set(mods) == set(resolved.layers)
    assert all(m.weight.dtype == torch.uint8 for m in mods.values())
    assert torch.equal(_probe(tr), out)
    assert torch.equal(_generate(loaded), images)
    # Saving the loaded model again reproduces the same checkpoint state.
    again = folder.parent / "again"
    loaded.save_pretrained(again)
    reloaded = DiTPipeline.from_pretrained(again).transformer
    assert torch.equal(_probe(reloaded), out)


def test_torch_dtype_on_load_does_not_touch_packed_parameters(quantized_dit):
    from diffusers import DiTTransformer2DModel

    pipe, *_, folder = quantized_dit
    tr = DiTTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16)
    a = pipe.transformer.transformer_blocks[1].ff.net[2]
    b = tr.transformer_blocks[1].ff.net[2]
    assert torch.equal(a.weight_params, b.weight_params) and torch.equal(a.smooth, b.smooth)
    assert b.bias.dtype == torch.bfloat16
    out = _probe(tr)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.skipif(not triton_runnable(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
def test_module_triton_path_matches_torch_path(quantized_dit):
    pipe, *_ = quantized_dit
    m = pipe.transformer.transformer_blocks[0].ff.net[2]
    x = torch.randn(5, 7, m.in_features, generator=torch.Generator().manual_seed(3))
    m.kernel = "torch"
    ref = m(x)
    m.kernel = "triton"
    try:
        got = m(x)
    finally:
        m.kernel = "auto"
    w = m.dequantized_weight()
    xt = m.transform_input(x)
    bound = (m.in_features + 8) * 2**-23 * (lrq.modules.fake_quant_per_token(xt, 8).abs() @ w.abs().T) + 1e-6
    assert ((got - ref).abs() <= bound + 2**-23 * ref.abs()).all()


def test_loading_a_float_checkpoint_with_lrq_config_is_refused(tmp_path):
    from diffusers import DiTTransformer2DModel

    from optimum_plugin.lrq_dit.registration import LRQDiTDiffusersConfig

    pipe = _tiny_dit_pipeline()
    pipe.transformer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        DiTTransformer2DModel.from_pretrained(tmp_path, quantization_config=LRQDiTDiffusersConfig(lrq.LRQDiTConfig()))


def test_nothing_to_quantize_raises():
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
        lrq.quantize_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), lrq.LRQDiTConfig(act_bits=None))
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
        lrq.quantize_(nn.Sequential(nn.Linear(8, 8)), lrq.LRQDiTConfig(act_bits=None, modules_to_not_convert=("*",)))
    pipe = _tiny_dit_pipeline()
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
        lrq.calibrate_pipeline(pipe, lrq.LRQDiTConfig(modules_to_not_convert=("*",)), [1], num_inference_steps=1)
    with pytest.raises(ValueError, match="prompts is empty"):
        lrq.calibrate_pipeline(pipe, lrq.LRQDiTConfig(), [], num_inference_steps=1)


@pytest.mark.parametrize("kw", [{"weight_bits": 2}, {"weight_bits": 16}, {"act_bits": 2}, {"act_bits": 12}])
def test_unsupported_bit_widths_raise(kw):
    with pytest.raises(ValueError, match="bit widths"):
        lrq.LRQDiTConfig(**kw)


def test_missing_statistics_and_resolved_configs_raise():
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="calibration"):
        lrq.quantize_(model, lrq.LRQDiTConfig(act_bits=8))
    resolved = lrq.quantize_(nn.Sequential(nn.Linear(16, 16)), lrq.LRQDiTConfig(act_bits=None))
    with pytest.raises(ValueError, match="already resolved"):
        lrq.quantize_(model, resolved)


def test_transformers_model_roundtrip(tmp_path):
    """transformers side of the registration: a small ViT (a DiT-style backbone) saves and loads packed."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                               image_size=16, patch_size=4, num_channels=1), add_pooling_layer=False).eval()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = lrq.LRQDiTConfig(weight_bits=4, act_bits=8)
    layers = lrq.target_linears(model, cfg)
    with lrq.ActivationRecorder(layers, cfg.calibration_tokens) as rec, torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    lrq.quantize_(model, cfg, rec.stats)
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    assert ((out - ref).norm() / ref.norm()) < 0.2
    model.save_pretrained(tmp_path)
    assert json.loads((Path(tmp_path) / "config.json").read_text())["quantization_config"]["quant_method"] == "lrq_dit"
    loaded = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert isinstance(loaded.get_submodule("layers.0.attention.q_proj"), LRQLinear)
    assert {n for n, m in loaded.named_modules() if isinstance(m, LRQLinear)} == set(layers)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, out)
    # Without the plugin (a fresh interpreter that never imports it), transformers only warns about the unknown
    # quant_method; the packed codes stored as `weight` then make it refuse instead of loading a float ViT with
    # freshly initialised weights.
    import subprocess
    import sys

    code = ("from transformers import ViTModel\n"
            f"ViTModel.from_pretrained({str(tmp_path)!r}, add_pooling_layer=False)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "ignore_mismatched_sizes" in r.stderr and "q_proj.weight" in r.stderr and "MISMATCH" in r.stderr
    assert "Unknown quantization type, got lrq_dit" in r.stderr
