"""HALO fine-tuning of the bundled SmolLM2-135M on this CPU: bf16 vs HALO-0 FP8, HALO-1 INT8, HALO-2 INT8.

    nice .venv/bin/python benchmarks/halo_finetune.py --json halo_finetune.json
    nice .venv/bin/python benchmarks/halo_finetune.py --steps 20 --eval-chunks 4     # a quick look

Each method fine-tunes the same initial weights on the same batches of
``data/calib_wikitext2_valid.txt`` (causal LM, all parameters, AdamW), with its final
``--eval-chunks`` chunks held out for evaluation. Master weights are float32 and every run uses
bfloat16 autocast; the baseline's linear layers run as bf16 GEMMs, HALO's as 8-bit GEMMs (real
INT8 through ``torch._int_mm`` on this CPU; FP8 as a float32 emulation, since the CPU ``_scaled_mm``
measured no faster). Methods run one
after another, each in a fresh process, so peak RSS is per method.

Step time is measured twice. During each training run (``train_step_time_s``, median wall seconds
per optimizer step after 5 warm-up steps) -- but the runs are sequential, so other jobs on a shared
machine load them differently. So a final timing phase trains one model and optimizer while
switching it between the methods round-robin (``--timing-rounds`` x ``--timing-steps`` steps each,
the first step after each switch discarded): ``step_time_s`` / ``step_time_ratio`` (wall, / bf16's)
and ``step_cpu_s`` / ``step_cpu_ratio`` (process CPU seconds) come from there, side by side under
the same conditions.

Other columns: ``eval_loss`` (held-out loss with the model's own training-time forward),
``eval_loss_bf16_forward`` (the same weights through plain bf16 linears), ``loss_ratio`` (eval_loss
/ bf16's), ``peak_rss_mib`` (the training process's peak resident memory: weights, gradients, AdamW
state and activations) and ``peak_rss_ratio``.

``--threads 1`` by default: on a machine whose 2 cores are shared with other jobs, a 2-thread
OpenMP GEMM waits for its slower thread and measured 2x slower than one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rotkv_data import CALIB_TEXT, data_path

DEFAULT_DATA = data_path(CALIB_TEXT)

METHODS = {
    "bf16": None,
    "halo0_fp8": dict(level=0, dtype="fp8_e4m3"),
    "halo1_int8": dict(level=1, dtype="int8"),
    "halo2_int8": dict(level=2, dtype="int8"),
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _step(model, opt, sched, ids):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run_timing(args) -> dict:
    """Interleaved step timing: one model and optimizer, switched between the methods round-robin."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_plugin.halo.apply import apply_halo, halo_modules, remove_halo
    from optimum_plugin.halo.config import HALOConfig
    from optimum_plugin.halo.data import token_chunks
    from rotkv_vllm.bundled_model import ensure_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    chunks = token_chunks(tok, args.data, args.seq_len)[: -args.eval_chunks]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    methods = args.timing_methods.split(",")
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    k = 0
    for _ in range(args.timing_rounds):
        for m in methods:
            if halo_modules(model):
                remove_halo(model)
            if METHODS[m] is not None:
                apply_halo(model, HALOConfig(granularity=args.granularity, **METHODS[m]))
            for i in range(args.timing_steps + 1):
                ids = chunks[(k * args.batch_size) % (chunks.shape[0] - args.batch_size):][: args.batch_size]
                k += 1
                t0, c0 = time.perf_counter(), _cpu_s()
                _step(model, opt, None, ids)
                if i:  # the first step after a switch is warm-up
                    wall[m].append(time.perf_counter() - t0)
                    cpu[m].append(_cpu_s() - c0)
            print(f"[timing] {m}: {statistics.median(wall[m]):.2f}s", file=sys.stderr)
    return {m: {"step_time_s": statistics.median(wall[m]), "step_cpu_s": statistics.median(cpu[m]),
                "timed_steps": len(wall[m])} for m in methods}


def run_method(args) -> dict:
    """Fine-tune one method in this process and return its row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_plugin.halo.apply import apply_halo, remove_halo
    from optimum_plugin.halo.config import HALOConfig
    from optimum_plugin.halo.data import causal_lm_nll, token_chunks, train_eval_split
    from rotkv_vllm.bundled_model import ensure_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    need = args.steps * args.batch_size + args.eval_chunks
    chunks = token_chunks(tok, args.data, args.seq_len)
    if chunks.shape[0] < need:
        raise SystemExit(f"{args.data}: {chunks.shape[0]} chunks of {args.seq_len} tokens, need {need}")
    train, evals = train_eval_split(chunks, args.eval_chunks)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    spec = METHODS[args.worker]
    row: dict = {"method": args.worker}
    if args.worker == "bf16" and args.initial_eval:
        model.eval()
        s, n = causal_lm_nll(model, evals, autocast_dtype=torch.bfloat16)
        row["initial_eval_loss"] = s / n
    if spec is not None:
        cfg = HALOConfig(granularity=args.granularity, **spec)
        apply_halo(model, cfg)
        row["config"] = cfg.to_dict()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    gen = torch.Generator().manual_seed(1234)
    order = torch.randperm(train.shape[0], generator=gen)
    times, cpus, losses = [], [], []
    for step in range(args.steps):
        ids = train[order[step * args.batch_size : (step + 1) * args.batch_size]]
        t0, c0 = time.perf_counter(), _cpu_s()
        loss = _step(model, opt, sched, ids)
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
        losses.append(float(loss))
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"[{args.worker}] step {step + 1}/{args.steps} loss {losses[-1]:.4f} {times[-1]:.2f}s", file=sys.stderr)
    model.eval()
    s, n = causal_lm_nll(model, evals, autocast_dtype=torch.bfloat16)
    row["eval_loss"] = s / n
    if spec is not None:
        remove_halo(model)
        s, n = causal_lm_nll(model, evals, autocast_dtype=torch.bfloat16)
        row["eval_loss_bf16_forward"] = s / n
        if args.export_dir and args.worker == args.export_method:
            from optimum_plugin.halo.export import save_merged, save_w8a8

            apply_halo(model, HALOConfig(granularity=args.granularity, **spec))
            out = Path(args.export_dir)
            save_merged(model, out / f"{args.worker}-merged-bf16", tok)
            save_w8a8(model, out / f"{args.worker}-w8a8", tok)
            row["exported_to"] = str(out)
    else:
        row["eval_loss_bf16_forward"] = row["eval_loss"]
    skip = min(5, max(0, args.steps - 1))
    row.update(
        train_loss_first=losses[0],
        train_loss_last10=statistics.fmean(losses[-10:]),
        train_step_time_s=statistics.median(times[skip:]),
        train_step_cpu_s=statistics.median(cpus[skip:]),
        steps=args.steps,
        tokens_per_step=args.batch_size * args.seq_len,
        eval_tokens=n,
        peak_rss_mib=_peak_rss_mib(),
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--granularity", default="row", choices=["row", "tensor"])
    p.add_argument("--eval-chunks", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--timing-steps", type=int, default=5, help="timed steps per method per round")
    p.add_argument("--export-dir", default=None, help="also export --export-method (merged bf16 + W8A8) here")
    p.add_argument("--export-method", default="halo2_int8")
    p.add_argument("--json", default=None, help="write the rows as a JSON list here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--initial-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timing-methods", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        row = run_timing(args) if args.worker == "timing" else run_method(args)
        Path(args.worker_out).write_text(json.dumps(row))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "bf16" not in methods:
        raise SystemExit(f"--methods: unknown {bad} (known: {list(METHODS)}); bf16 is required as the baseline")
    def worker(name: str, out: Path, *extra: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(out), *extra]
        for k in ("steps", "seq_len", "batch_size", "lr", "granularity", "eval_chunks", "threads", "data",
                  "log_every", "export_method", "timing_rounds", "timing_steps"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.export_dir:
            cmd += ["--export-dir", args.export_dir]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return json.loads(out.read_text())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            t0 = time.time()
            row = worker(m, Path(tmp) / f"{m}.json", *(["--initial-eval"] if m == "bf16" else []))
            row["wall_s"] = time.time() - t0
            rows.append(row)
        timing = worker("timing", Path(tmp) / "timing.json", "--timing-methods", ",".join(methods))
    for r in rows:
        r.update(timing[r["method"]])
    base = next(r for r in rows if r["method"] == "bf16")
    for r in rows:
        r["loss_ratio"] = r["eval_loss"] / base["eval_loss"]
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
        r["step_cpu_ratio"] = r["step_cpu_s"] / base["step_cpu_s"]
        r["train_step_time_ratio"] = r["train_step_time_s"] / base["train_step_time_s"]
        r["peak_rss_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]

    print(f"\nSmolLM2-135M, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, "
          f"{args.threads} thread(s), eval on {base['eval_tokens']} held-out tokens "
          f"(initial eval loss {base.get('initial_eval_loss', float('nan')):.4f}); step times interleaved "
          f"({args.timing_rounds} x {args.timing_steps} steps per method), train_s = median during its own run")
    hdr = (f"{'method':<12}{'eval_loss':>10}{'loss_ratio':>11}{'bf16_fwd':>10}{'step_s':>8}{'step_ratio':>11}"
           f"{'cpu_s':>8}{'cpu_ratio':>10}{'train_s':>9}{'peak_MiB':>10}{'mem_ratio':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['method']:<12}{r['eval_loss']:>10.4f}{r['loss_ratio']:>11.4f}{r['eval_loss_bf16_forward']:>10.4f}"
              f"{r['step_time_s']:>8.2f}{r['step_time_ratio']:>11.2f}{r['step_cpu_s']:>8.2f}{r['step_cpu_ratio']:>10.2f}"
              f"{r['train_step_time_s']:>9.2f}{r['peak_rss_mib']:>10.0f}{r['peak_rss_ratio']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
