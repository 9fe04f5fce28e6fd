"""Next-token NLL of token chunks through the real vLLM engine (offline ``vllm.LLM``, prompt logprobs).

    python -m optimum_plugin.halo.vllm_eval MODEL_DIR CHUNKS.pt OUT.json [--dtype float32]

``CHUNKS.pt`` holds an ``(n, L)`` int64 tensor; each chunk is sent as token ids and scored at
positions 1..L-1 (the same positions as :func:`optimum_plugin.halo.data.causal_lm_nll`). The engine
runs eagerly (``enforce_eager=True``) with ``VLLM_CPU_KVCACHE_SPACE=1`` unless set. vLLM's CPU
platform spawns worker processes, so this runs as its own ``__main__``; :func:`run_vllm_nll` calls
it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["run_vllm_nll", "vllm_chunk_nll"]


def vllm_chunk_nll(model_dir: str, chunks, dtype: str = "float32") -> dict:
    """Run in a ``__main__`` process: returns ``{"nll": sum, "tokens": count, "quantization": name}``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    seq = int(chunks.shape[1])
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=max(seq + 8, 256), seed=0,
              enable_prefix_caching=False, max_num_seqs=8)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in chunks]
    outs = llm.generate(prompts, params, use_tqdm=False)
    total, count = 0.0, 0
    for row, out in zip(chunks.tolist(), outs):
        plp = out.prompt_logprobs
        for pos in range(1, len(row)):
            total -= plp[pos][row[pos]].logprob
            count += 1
    quant = llm.llm_engine.model_config.quantization
    return {"nll": total, "tokens": count, "quantization": quant}


def run_vllm_nll(model_dir: str | os.PathLike, chunks, dtype: str = "float32", plugins: str = "halo",
                 timeout: float = 900.0) -> dict:
    """:func:`vllm_chunk_nll` in a fresh process (``VLLM_PLUGINS=plugins``); raises on failure."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        cpath, opath = Path(tmp) / "chunks.pt", Path(tmp) / "out.json"
        torch.save(chunks.cpu(), cpath)
        env = dict(os.environ, VLLM_PLUGINS=plugins)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = [sys.executable, "-m", "optimum_plugin.halo.vllm_eval", str(model_dir), str(cpath), str(opath),
               "--dtype", dtype]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not opath.exists():
            raise RuntimeError(f"vLLM evaluation failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(opath.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("chunks")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    import torch

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    chunks = torch.load(a.chunks)
    Path(a.out).write_text(json.dumps(vllm_chunk_nll(a.model_dir, chunks, a.dtype)))


if __name__ == "__main__":
    main()
