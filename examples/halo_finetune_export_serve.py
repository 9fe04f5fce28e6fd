"""Fine-tune a causal LM with HALO (every large matmul of training in INT8, Hadamard-rotated), export it as a W8A8
checkpoint and serve it with vLLM.

    python examples/halo_finetune_export_serve.py                   # the bundled SmolLM2-135M-Instruct, 8 steps
    python examples/halo_finetune_export_serve.py --steps 200 --level 2 --out out/halo2
    python examples/halo_finetune_export_serve.py --no-serve        # stop after checking the export in PyTorch

Trains on chunks of the bundled calibration text (its last chunks held out for the evaluation loss), writes the
compressed-tensors W8A8 checkpoint (:func:`optimum_plugin.halo.save_w8a8`: INT8 weights per channel, INT8
activations per token, the Hadamard input transforms), evaluates it with vLLM's integer maths in PyTorch
(:func:`optimum_plugin.halo.load_w8a8`) and answers a prompt greedily there and through ``vllm.LLM``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a transformers causal LM folder (default: the bundled SmolLM2)")
    ap.add_argument("--level", type=int, default=1, choices=(0, 1, 2), help="HALO level (rotation placement)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--out", help="the W8A8 checkpoint folder (default: a temporary folder)")
    ap.add_argument("--prompt", default="The history of the city begins")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--no-serve", action="store_true", help="skip vLLM")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_plugin.halo import HALOConfig, apply_halo, load_w8a8, save_w8a8
    from optimum_plugin.halo.data import causal_lm_nll, token_chunks, train_eval_split
    from rotkv_data import data_path
    from rotkv_vllm.bundled_model import ensure_smollm2

    folder = args.model or ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    chunks = token_chunks(tok, data_path("calib_wikitext2_valid.txt"), args.seq_len,
                          max_chunks=args.steps * args.batch_size + args.eval_chunks)
    train, held_out = train_eval_split(chunks, args.eval_chunks)

    def eval_loss(m) -> float:
        m.eval()
        nll, count = causal_lm_nll(m, held_out)
        return nll / count

    apply_halo(model, HALOConfig(level=args.level, dtype="int8"))
    loss_before = eval_loss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for step in range(args.steps):
        batch = train[step * args.batch_size:(step + 1) * args.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step + 1}/{args.steps}: train loss {loss.item():.4f}")
    loss_after = eval_loss(model)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="halo-")) / "w8a8"
    save_w8a8(model, out, tok)
    exported = load_w8a8(out).eval()
    loss_w8a8 = eval_loss(exported)
    print(f"held-out loss: {loss_before:.4f} before, {loss_after:.4f} after HALO-{args.level} fine-tuning, "
          f"{loss_w8a8:.4f} for the W8A8 export ({out})")
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = exported.generate(ids, max_new_tokens=args.max_tokens, do_sample=False)
    result = {"out": out, "loss_before": loss_before, "loss_after": loss_after, "loss_w8a8": loss_w8a8,
              "transformers_tokens": gen[0, ids.shape[1]:].tolist(), "vllm_tokens": None}
    print(f"transformers (W8A8): {tok.decode(result['transformers_tokens'])!r}")
    if not args.no_serve:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(out), enforce_eager=True, max_model_len=512)
        res = llm.generate([args.prompt], SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
        result["vllm_tokens"] = list(res[0].outputs[0].token_ids)
        print(f"vLLM (W8A8):         {res[0].outputs[0].text!r}")
    return result


if __name__ == "__main__":  # vLLM's CPU platform spawns workers: the entry point must be guarded
    main()
