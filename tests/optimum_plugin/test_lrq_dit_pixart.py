"""The same LRQ-DiT config on a standard diffusers DiT architecture: a small random PixArt-alpha pipeline
(PixArtTransformer2DModel, a 1-layer T5 encoder and a word-level tokenizer built in memory, a tiny VAE),
calibrated through PixArtAlphaPipeline on text prompts, saved, and loaded back with from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

import optimum_plugin.lrq_dit as lrq
from optimum_plugin.lrq_dit.modules import LRQLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["<pad>", "</s>", "<unk>"] + "a an the cat dog tree house red blue small big photo of in snow".split()
PROMPTS = ["a red cat", "a photo of the big tree", "a small dog in snow", "the blue house"]
# A 6-point Twin-Log grid keeps this test fast; the default grid is exercised on the trained model.
SMALL_GRID = dict(eta_grid=(0.01, 0.1, 1.0), clip_lower_grid=(0.0,), clip_upper_grid=(1.0, 0.98))
RUN = dict(num_inference_steps=2, height=16, width=16, max_sequence_length=16, use_resolution_binning=False,
           clean_caption=False)


def _pixart_pipeline():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=16)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                           num_layers=1)).eval()
    # Width 144 = 2 heads x 72 (PixArt's head size; PixArt-alpha itself is 16 x 72 = 1152): 144 = 36 * 4 and the
    # MLP's 576 = 36 * 16 rotate with generated Paley-II Hadamard matrices, not powers of two.
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=144, sample_size=8, patch_size=2,
                                           caption_channels=32, norm_num_groups=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _probe(transformer):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return transformer(x, encoder_hidden_states=enc, timestep=torch.tensor([100, 700]),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@pytest.mark.parametrize("block", [None, 48], ids=["full-width", "block-48"])
def test_pixart_pipeline_quantizes_saves_and_loads(tmp_path, block):
    from diffusers import PixArtAlphaPipeline

    pipe = _pixart_pipeline()
    ref = _probe(pipe.transformer)
    # 48 divides neither the 32 text features nor the 256 sinusoidal timestep features: those two stay float.
    skip = ("caption_projection.linear_1", "adaln_single.emb.timestep_embedder.linear_1") if block else ()
    cfg = lrq.LRQDiTConfig(weight_bits=4, act_bits=8, rotation="hadamard", rotation_block_size=block,
                           modules_to_not_convert=skip, **SMALL_GRID)
    resolved = lrq.quantize_pipeline(pipe, cfg, PROMPTS, batch_size=2, progress=False, **RUN)
    plans = resolved.layers
    assert len(plans) == 2 * 10 + 3 + 2 + 1 - len(skip)  # blocks, adaLN-single, caption projection, proj_out
    assert plans["transformer_blocks.0.ff.net.2"].block_size == (block or 576)
    assert plans["transformer_blocks.0.attn1.to_q"].block_size == (block or 144)
    out = _probe(pipe.transformer)
    assert ((out - ref).norm() / ref.norm()) < 0.2

    pipe.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lrq_dit" and set(qc["layers"]) == set(plans)
    loaded = PixArtAlphaPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    tr = loaded.transformer
    assert {n for n, m in tr.named_modules() if isinstance(m, LRQLinear)} == set(plans)
    assert torch.equal(_probe(tr), out)
    images = loaded(PROMPTS[:1], generator=torch.Generator().manual_seed(0), output_type="pt", **RUN).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_block_size_that_does_not_divide_a_layer_names_it():
    from diffusers import PixArtTransformer2DModel

    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=1, cross_attention_dim=144, sample_size=8, caption_channels=32)
    # A forced Hadamard without shift or smoothing needs no statistics, so the plan fails before any work.
    cfg = lrq.LRQDiTConfig(weight_bits=4, act_bits=8, rotation="hadamard", rotation_block_size=48, shift=False,
                           smooth_alpha=None)
    with pytest.raises(ValueError, match=r"layer '[\w.]+': rotation_block_size=48 does not divide"):
        lrq.quantize_(tr, cfg)
