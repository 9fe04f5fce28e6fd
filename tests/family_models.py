"""Small random-weight models of each family RotateKV serves (``rotkv_vllm.model_support.FAMILIES``).

Each builder returns a transformers causal LM (fp32, eval mode, seeded) whose attention has what makes its
family different from Llama, made large enough to matter:

    llama    llama3 RoPE scaling (low frequencies stretched)
    mistral  as llama (``sliding_window=None``, as Mistral 7B v0.2+; ``window=`` gives the v0.1 kind)
    qwen2    k_proj bias of std 2 (Qwen2.5's keys carry large fixed offsets; transformers initializes it to 0)
    qwen3    k_norm weights drawn around 1 (transformers initializes them to 1)
    gemma3   head size 256, query_pre_attn_scalar 64 (not the head size), k_norm weights drawn around 0
             (Gemma's norm multiplies by 1 + w), linear RoPE scaling on global layers; all layers global by
             default (what the vLLM backend serves), ``window=`` makes every other layer a local one with its
             own RoPE base

Weights are drawn with ``initializer_range=0.2`` (transformers' default 0.02 makes a 2-layer random model's
attention nearly uniform and its logits nearly flat, where no KV cache error would show). Vocabulary: SmolLM2's
tokenizer (``tokenizer`` argument), so the repo's texts tokenize as for the bundled model. Every model has 2
KV heads, which tensor parallel size 2 splits one per rank.
"""

from __future__ import annotations

import torch

FAMILY_NAMES = ("llama", "qwen2", "qwen3", "gemma3", "mistral")


def _common(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.2,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def build_family_model(name: str, tokenizer, *, window: int | None = None, seed: int = 0):
    """The small ``name`` model (one of :data:`FAMILY_NAMES`); ``window`` adds sliding-window layers (mistral:
    every layer; qwen2/qwen3: layer 1; gemma3: layer 0, a local layer with its own RoPE base)."""
    import transformers as tf

    torch.manual_seed(seed)
    c = _common(tokenizer)
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, head_dim=32, **c,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 1024})
        model = tf.LlamaForCausalLM(cfg)
    elif name == "mistral":
        cfg = tf.MistralConfig(hidden_size=128, intermediate_size=256, head_dim=32, sliding_window=window,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **c)
        model = tf.MistralForCausalLM(cfg)
    elif name in ("qwen2", "qwen3"):
        extra = dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=1)
        if name == "qwen2":
            cfg = tf.Qwen2Config(hidden_size=128, intermediate_size=256, **extra, **c,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
            model = tf.Qwen2ForCausalLM(cfg)
        else:
            cfg = tf.Qwen3Config(hidden_size=128, intermediate_size=256, head_dim=32, **extra, **c,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
            model = tf.Qwen3ForCausalLM(cfg)
    elif name == "gemma3":
        c = dict(c, num_attention_heads=2)
        types = ["sliding_attention" if (window is not None and i % 2 == 0) else "full_attention" for i in range(2)]
        cfg = tf.Gemma3TextConfig(hidden_size=128, intermediate_size=256, head_dim=256, query_pre_attn_scalar=64,
                                  sliding_window=window or 4096, layer_types=types, **c,
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                      "rope_theta": 1000000.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}})
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {name!r}: expected one of {FAMILY_NAMES}")
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if name == "qwen2":
                attn.k_proj.bias.copy_(2.0 * torch.randn(attn.k_proj.bias.shape, generator=gen))
            if name == "qwen3":
                attn.k_norm.weight.copy_(1.0 + 0.5 * torch.randn(attn.k_norm.weight.shape, generator=gen))
            if name == "gemma3":
                attn.k_norm.weight.copy_(0.5 * torch.randn(attn.k_norm.weight.shape, generator=gen))
    return model
