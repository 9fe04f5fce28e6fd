"""Generate with transformers through a packed RotateKV KV cache, next to the full-precision cache.

    python examples/generate_rotkv.py                          # the bundled SmolLM2-135M-Instruct, rotkv2
    python examples/generate_rotkv.py --model MODEL_DIR --bits 4 --prompt "Why is the sky blue?"

Calibrates in memory on the bundled calibration text (use ``python -m rotkv_vllm.calibration`` to keep one
beside the model), then decodes greedily twice: with transformers' own ``DynamicCache`` and with ``rotkv_cache``,
whose layers hold only pages of 2-4 bit records (plus the full-precision sink token and the ``rotkv{bits}`` preset's
recent-window ring, as ``vllm serve --kv-cache-dtype rotkv{bits}`` stores them) and whose attention reads them
through the vLLM backend's kernels. Prints both answers and the bytes each cache held.
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a transformers Llama-family model folder (default: the bundled SmolLM2)")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--attention-impl", default="auto", choices=("auto", "cpu", "torch", "triton"),
                    help="which kernels read the pages (rotkv_vllm.hf_cache); auto: the C++ CPU kernel when built")
    ap.add_argument("--calib-sequences", type=int, default=8, help="calibration chunks of 512 tokens")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from rotkv_data import data_path
    from rotkv_vllm.bundled_model import ensure_smollm2
    from rotkv_vllm.calibration import calibrate
    from rotkv_vllm.demo import serving_config
    from rotkv_vllm.hf_cache import rotkv_cache

    folder = args.model or ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calibration = calibrate(model, tok, serving_config(args.bits), text_file=data_path("calib_wikitext2_valid.txt"),
                            num_sequences=args.calib_sequences, seq_len=512, progress=False)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    greedy = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    with torch.no_grad():
        dynamic = DynamicCache(config=model.config)
        full = model.generate(ids, past_key_values=dynamic, **greedy)
        with rotkv_cache(model, calibration, attention_impl=args.attention_impl) as cache:
            packed = model.generate(ids, past_key_values=cache, **greedy)
    result = {
        "full_precision": tok.decode(full[0, ids.shape[1]:], skip_special_tokens=True),
        "rotkv": tok.decode(packed[0, ids.shape[1]:], skip_special_tokens=True),
        "bits_per_element": cache.bits_per_element(),
        "cache_bytes": cache.quantized_nbytes(),
        "dynamic_cache_bytes": sum(t.nbytes for layer in dynamic.layers for t in (layer.keys, layer.values)),
    }
    print(f"full-precision cache: {result['full_precision']!r}")
    print(f"rotkv{args.bits} cache:        {result['rotkv']!r}")
    print(f"{result['bits_per_element']:.2f} bits per cached K/V element; the cache held {result['cache_bytes']} bytes "
          f"(pages of {cache.block_size} tokens), DynamicCache {result['dynamic_cache_bytes']} ({model.dtype})")
    return result


if __name__ == "__main__":
    main()
