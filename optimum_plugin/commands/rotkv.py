"""The ``optimum-cli rotkv`` command group and its three commands (see the package docstring).

Each command: check the Hub token first when ``--push-to-hub`` is given (a wrong token fails in a second, not
after calibration), load the source (folder or repo id), run the method's ``OptimumQuantizer``
(:mod:`optimum_plugin.quantizers`) with progress bars, write the output folder and its model card, push it as one
commit, and print a summary. User errors (:data:`rotkv_vllm.cli.USER_ERRORS`) exit with one line,
``optimum-cli rotkv NAME: error: ...``, and status 1.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from optimum_plugin.hub import human_bytes
from rotkv_vllm.cli import USER_ERRORS, one_line

__all__ = ["RotKVCommand", "RotateKVCommand", "LRQDiTCommand", "HALOExportCommand", "PushCommand", "command_line"]


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, for the model card, with the value of ``--token`` replaced by ``$HF_TOKEN``."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    for i, a in enumerate(args):
        if i > 0 and args[i - 1] == "--token":
            out.append("$HF_TOKEN")
        elif a.startswith("--token="):
            out.append("--token=$HF_TOKEN")
        else:
            out.append(shlex.quote(a))
    return " ".join(["optimum-cli", *out])


def _add_common(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-m", "--model", required=True, help=f"{what}: a local folder or a Hub repo id")
    parser.add_argument("output", type=Path, help="the output folder (new or empty, unless --overwrite)")
    parser.add_argument("--model-revision", help="revision of --model when it is a repo id")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--base-model",
                        help="Hub id written as base_model in the card (default: --model if it is a repo id)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="push the output folder to this repo (one commit)")
    _add_push_options(hub)


def _add_push_options(hub) -> None:
    hub.add_argument("--private", action="store_true", help="create the repo private (when it does not exist)")
    hub.add_argument("--token", help="a write token (default: HF_TOKEN or the token of `hf auth login`)")
    hub.add_argument("--revision", help="the branch to push to (created from main if missing; default main)")
    hub.add_argument("--commit-message", help="the commit message")
    hub.add_argument("--retries", type=int, default=3, help="retries after transient Hub errors (default 3)")


def _add_eval(parser: argparse.ArgumentParser, window: int) -> None:
    ev = parser.add_argument_group("evaluation (written to the model card)")
    src = ev.add_mutually_exclusive_group()
    src.add_argument("--eval-file", help="evaluation text (default: the project's wikitext2_test.txt when present)")
    src.add_argument("--eval-dataset", help="datasets spec name[:config[:split]] for the evaluation text")
    src.add_argument("--no-eval", action="store_true", help="publish without an evaluation")
    ev.add_argument("--eval-tokens", type=int, default=4096, help="tokens evaluated (default 4096)")
    ev.add_argument("--eval-window", type=int, default=window, help=f"tokens per window (default {window})")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("optimum_plugin", "rotkv_vllm"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(handler)
        lg.setLevel(logging.INFO)


def _summary(name: str, out: Path, spec, pushed) -> str:
    files = [p for p in out.rglob("*") if p.is_file()]
    lines = [f"== optimum-cli rotkv {name}: done",
             f"  output       {out} ({len(files)} files, {human_bytes(sum(p.stat().st_size for p in files))})"]
    if spec.calibration is not None:
        cal = spec.calibration
        desc = ", ".join(f"{k}={v}" for k, v in cal.items() if k != "prompts")
        if "prompts" in cal:
            desc = f"{len(cal['prompts'])} prompts, " + desc
        lines.append(f"  calibration  {desc}")
    for row in spec.evaluation:
        ref, q = row["reference"], row["quantized"]
        ratio = f" (x{q / ref:.4f})" if isinstance(ref, (int, float)) and ref else ""
        rname = f" [{row['reference_name']}]" if row.get("reference_name") else ""
        fmt = (lambda x: f"{x:.4g}" if isinstance(x, float) else str(x))
        lines.append(f"  evaluation   {row['metric']} on {row['data']}: {fmt(ref)}{rname} -> {fmt(q)}{ratio}")
    for s in spec.sizes:
        lines.append(f"  size         {s['what']}: {human_bytes(s['quantized_bytes'])} vs "
                     f"{human_bytes(s['bf16_bytes'])} "
                     f"in bf16 ({s['bf16_bytes'] / max(s['quantized_bytes'], 1):.2f}x smaller)")
    repo = str(out)
    if pushed is not None:
        repo = pushed.repo_id
        vis = {True: "private", False: "public", None: "visibility unknown"}[pushed.private]
        lines.append(f"  pushed       {pushed.url} @ {pushed.revision}: commit {pushed.commit_oid[:12]} "
                     f"({pushed.files} files, {human_bytes(pushed.bytes)}, {vis}, "
                     f"{pushed.retries} retried request(s))")
    if spec.usage:
        code = spec.usage[0][2].replace("{repo}", repo).strip().splitlines()
        lines.append(f"  use it       {code[0] if len(code) == 1 else spec.usage[0][0]}")
        if len(code) > 1:
            lines += [f"               {c}" for c in code]
    return "\n".join(lines)


class _MethodCommand(BaseOptimumCLICommand):
    """Shared run(): token check, quantize, push, summary; user errors exit cleanly."""

    def run(self) -> None:
        from optimum_plugin.hub import HubPushError

        _setup_logging()
        args = self.args
        try:
            if args.push_to_hub:
                from optimum_plugin.hub import check_push_access

                user = check_push_access(args.push_to_hub, token=args.token)
                logging.getLogger("optimum_plugin").info("will push to %s as %s", args.push_to_hub, user)
            quantizer = self._quantize(args, command_line())
            pushed = None
            if args.push_to_hub:
                pushed = quantizer.push_to_hub(args.push_to_hub, token=args.token, private=args.private,
                                               revision=args.revision, commit_message=args.commit_message,
                                               retries=args.retries, progress=not args.no_progress)
        except HubPushError as e:
            # The output is complete; only the upload failed: say how to retry it without recomputing.
            retry = ["optimum-cli", "rotkv", "push", str(args.output), args.push_to_hub]
            retry += ["--private"] if args.private else []
            retry += ["--revision", args.revision] if args.revision else []
            raise SystemExit(f"optimum-cli rotkv {self.COMMAND.name}: error: {one_line(e)}; the output folder "
                             f"{args.output} is complete: retry the upload alone with `{shlex.join(retry)}`") from None
        except USER_ERRORS as e:
            raise SystemExit(f"optimum-cli rotkv {self.COMMAND.name}: error: {one_line(e)}") from None
        print(_summary(self.COMMAND.name, quantizer.save_dir, quantizer.card_spec, pushed), flush=True)

    def _quantize(self, args: argparse.Namespace, command: str) -> Any:
        raise NotImplementedError


class RotateKVCommand(_MethodCommand):
    COMMAND = CommandInfo(name="rotatekv", help="RotateKV: calibrate a causal LM for a 2/3/4-bit KV cache")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, "the causal LM (transformers checkpoint)")
        cal = parser.add_argument_group("calibration")
        src = cal.add_mutually_exclusive_group(required=True)
        src.add_argument("--calib-file", help="calibration text file (never the evaluation text)")
        src.add_argument("--calib-dataset", help="datasets spec name[:config[:split]]")
        cal.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="K/V bits (default 2)")
        cal.add_argument("--sink-mode", choices=("first", "topk", "none"),
                         help="attention sinks (default: first positions, which vLLM serves); topk is the paper's "
                              "(transformers only)")
        cal.add_argument("--config-json", help="a RotateKVConfig JSON file (overrides --bits and --sink-mode)")
        cal.add_argument("--num-sequences", type=int, default=32)
        cal.add_argument("--seq-len", type=int, default=512)
        cal.add_argument("--tensor-parallel-size", type=int, default=1)
        _add_eval(parser, 1024)

    def _quantize(self, args, command):
        from rotkv_vllm.config import RotateKVConfig
        from rotkv_vllm.demo import serving_config

        from optimum_plugin.quantizers import RotateKVQuantizer

        if args.config_json:
            p = Path(args.config_json)
            if not p.is_file():
                raise ValueError(f"--config-json {p} does not exist")
            config = RotateKVConfig.from_json(p.read_text())
        else:
            config = serving_config(args.bits, **({"sink_mode": args.sink_mode} if args.sink_mode else {}))
        q = RotateKVQuantizer.from_pretrained(args.model, revision=args.model_revision, token=args.token)
        q.quantize(args.output, config=config, calib_file=args.calib_file, calib_dataset=args.calib_dataset,
                   num_sequences=args.num_sequences, seq_len=args.seq_len,
                   tensor_parallel_size=args.tensor_parallel_size, evaluate=not args.no_eval,
                   eval_file=args.eval_file, eval_dataset=args.eval_dataset, eval_tokens=args.eval_tokens,
                   eval_window=args.eval_window, repo_id=args.push_to_hub, base_model=args.base_model,
                   overwrite=args.overwrite, progress=not args.no_progress, command=command)
        return q


def _none_or(kind):
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)
    return parse


class LRQDiTCommand(_MethodCommand):
    COMMAND = CommandInfo(name="lrq-dit", help="LRQ-DiT: quantize a diffusers pipeline's transformer")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, "the diffusers pipeline")
        cal = parser.add_argument_group("calibration and recipe")
        src = cal.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompts", help="comma-separated prompts or class labels (e.g. 0,1,2,3)")
        src.add_argument("--prompts-file", help="one prompt or class label per line")
        cal.add_argument("--component", default="transformer", help="the pipeline component quantized")
        cal.add_argument("--weight-bits", type=int, default=4, choices=(3, 4, 8))
        cal.add_argument("--act-bits", type=_none_or(int), default=8, help="4, 6, 8 or none (weight-only)")
        cal.add_argument("--weight-quantizer", choices=("twin_log", "uniform"), default="twin_log")
        cal.add_argument("--rotation", choices=("auto", "hadamard", "outlier_aware", "none"), default="auto")
        cal.add_argument("--smooth-alpha", type=_none_or(float), default=0.5, help="smoothing strength or none")
        cal.add_argument("--modules-to-not-convert", nargs="*", default=[], help="fnmatch patterns kept in float")
        cal.add_argument("--config-json", help="an LRQDiTConfig JSON file (overrides the recipe flags)")
        cal.add_argument("--num-inference-steps", type=int, default=20)
        cal.add_argument("--batch-size", type=int, default=8)
        cal.add_argument("--guidance-scale", type=float, help="passed to the pipeline")
        cal.add_argument("--seed", type=int, default=0)
        ev = parser.add_argument_group("evaluation (written to the model card)")
        ev.add_argument("--eval-prompts", help="comma-separated (default: the first 4 calibration prompts)")
        ev.add_argument("--eval-steps", type=int, help="denoising steps of the samples (default: as calibration)")
        ev.add_argument("--no-eval", action="store_true", help="publish without an evaluation")

    @staticmethod
    def _prompts(raw: list[str], pipe) -> list:
        from optimum_plugin.lrq_dit.optimum_quantizer import pipeline_prompt_argument

        if pipeline_prompt_argument(pipe) != "class_labels":
            return raw
        try:
            return [int(p) for p in raw]
        except ValueError:
            raise ValueError(f"{type(pipe).__name__} takes class labels: --prompts must be integers, got {raw}")

    def _quantize(self, args, command):
        from optimum_plugin.lrq_dit import LRQDiTConfig
        from optimum_plugin.quantizers import LRQDiTQuantizer

        if args.config_json:
            p = Path(args.config_json)
            if not p.is_file():
                raise ValueError(f"--config-json {p} does not exist")
            config = LRQDiTConfig.from_json(p.read_text())
        else:
            config = LRQDiTConfig(weight_bits=args.weight_bits, act_bits=args.act_bits,
                                  weight_quantizer=args.weight_quantizer, rotation=args.rotation,
                                  smooth_alpha=args.smooth_alpha,
                                  modules_to_not_convert=tuple(args.modules_to_not_convert))
        if args.prompts_file:
            p = Path(args.prompts_file)
            if not p.is_file():
                raise ValueError(f"--prompts-file {p} does not exist")
            raw = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        else:
            raw = [s.strip() for s in args.prompts.split(",") if s.strip()]
        q = LRQDiTQuantizer.from_pretrained(args.model, revision=args.model_revision, token=args.token,
                                            component=args.component)
        prompts = self._prompts(raw, q.pipeline)
        eval_prompts = None
        if args.eval_prompts:
            eval_prompts = self._prompts([s.strip() for s in args.eval_prompts.split(",") if s.strip()], q.pipeline)
        pipe_kwargs = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
        q.quantize(args.output, config=config, prompts=prompts, num_inference_steps=args.num_inference_steps,
                   batch_size=args.batch_size, seed=args.seed, pipe_kwargs=pipe_kwargs, evaluate=not args.no_eval,
                   eval_prompts=eval_prompts, eval_steps=args.eval_steps, repo_id=args.push_to_hub,
                   base_model=args.base_model, overwrite=args.overwrite, progress=not args.no_progress,
                   command=command)
        return q


class HALOExportCommand(_MethodCommand):
    COMMAND = CommandInfo(name="halo-export", help="HALO: export a fine-tuned checkpoint (W8A8 for vLLM, or bf16)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, "the fine-tuned checkpoint (transformers folder or PEFT adapter)")
        ex = parser.add_argument_group("export")
        ex.add_argument("--format", dest="export_format", choices=("w8a8", "bf16"), default="w8a8")
        ex.add_argument("--hadamard", choices=("full", "block", "none"), default="full")
        ex.add_argument("--block-size", type=int, default=64, help="Hadamard block for --hadamard block")
        ex.add_argument("--skip-modules", nargs="*",
                        help="layers kept in bf16 (default: the HALO config's, else lm_head)")
        _add_eval(parser, 512)

    def _quantize(self, args, command):
        from optimum_plugin.quantizers import HALOQuantizer

        q = HALOQuantizer.from_pretrained(args.model, revision=args.model_revision, token=args.token)
        q.quantize(args.output, export_format=args.export_format, hadamard=args.hadamard, block_size=args.block_size,
                   skip_modules=args.skip_modules, evaluate=not args.no_eval, eval_file=args.eval_file,
                   eval_dataset=args.eval_dataset, eval_tokens=args.eval_tokens, eval_window=args.eval_window,
                   repo_id=args.push_to_hub, base_model=args.base_model, overwrite=args.overwrite,
                   progress=not args.no_progress, command=command)
        return q


class PushCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="push", help="push a folder written by one of these commands (one atomic commit)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("folder", type=Path, help="the output folder of rotatekv / lrq-dit / halo-export")
        parser.add_argument("repo_id", help="namespace/name (created if missing)")
        _add_push_options(parser)
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self) -> None:
        from optimum_plugin.hub import HubPushError, human_bytes, push_to_hub

        _setup_logging()
        a = self.args
        try:
            res = push_to_hub(a.folder, a.repo_id, token=a.token, private=a.private, revision=a.revision,
                              commit_message=a.commit_message, retries=a.retries, progress=not a.no_progress)
        except (HubPushError, *USER_ERRORS) as e:
            raise SystemExit(f"optimum-cli rotkv push: error: {one_line(e)}") from None
        print(f"== optimum-cli rotkv push: done\n  pushed       {res.url} @ {res.revision}: commit "
              f"{res.commit_oid[:12]} ({res.files} files, {human_bytes(res.bytes)}, {res.retries} retried "
              "request(s))", flush=True)


class RotKVCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="rotkv", help="rotkv: RotateKV, LRQ-DiT and HALO quantization with Hub push")
    SUBCOMMANDS = (
        CommandInfo(name=RotateKVCommand.COMMAND.name, help=RotateKVCommand.COMMAND.help,
                    subcommand_class=RotateKVCommand),
        CommandInfo(name=LRQDiTCommand.COMMAND.name, help=LRQDiTCommand.COMMAND.help, subcommand_class=LRQDiTCommand),
        CommandInfo(name=HALOExportCommand.COMMAND.name, help=HALOExportCommand.COMMAND.help,
                    subcommand_class=HALOExportCommand),
        CommandInfo(name=PushCommand.COMMAND.name, help=PushCommand.COMMAND.help, subcommand_class=PushCommand),
    )
