"""Serve a model with a RotateKV KV cache through vLLM's Python API (``vllm serve DIR --kv-cache-dtype rotkv2``
is the same engine behind an OpenAI-compatible server).

    python examples/serve_rotkv.py                             # the bundled SmolLM2-135M-Instruct, rotkv2
    python examples/serve_rotkv.py --model MODEL_DIR --bits 4 --prompt "Name three primes."

Prepares a serving folder (links to the model's files plus a RotateKV calibration, made once on the bundled
calibration text), starts vLLM with ``kv_cache_dtype="rotkv{bits}"`` (the ``rotkv`` plugin adds these dtypes and
the attention backend) and answers the prompts greedily. The engine's log states the KV-cache capacity it
planned (``python -m rotkv_vllm.demo`` measures it against bf16).
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a transformers Llama-family model folder (default: the bundled SmolLM2)")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--prompt", action="append", help="a user message (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--work-dir", help="the serving folder (default: under the rotkv cache)")
    ap.add_argument("--calib-sequences", type=int, default=8, help="calibration chunks of 512 tokens")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU

    from pathlib import Path

    from rotkv_vllm.bundled_model import cache_root, ensure_smollm2
    from rotkv_vllm.demo import prepare_model, serving_config

    src = Path(args.model) if args.model else ensure_smollm2()
    work = Path(args.work_dir) if args.work_dir else cache_root() / "examples" / f"{src.name}-rotkv{args.bits}"
    folder = prepare_model(src, work, serving_config(args.bits), num_sequences=args.calib_sequences)

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), kv_cache_dtype=f"rotkv{args.bits}", enforce_eager=True, max_model_len=2048)
    prompts = args.prompt or ["What is the capital of France?", "Write one sentence about the sea."]
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    answers = [o.outputs[0].text for o in outs]
    for p, a in zip(prompts, answers):
        print(f"{p}\n  -> {a!r}")
    return answers


if __name__ == "__main__":  # vLLM's CPU platform spawns workers: the entry point must be guarded
    main()
