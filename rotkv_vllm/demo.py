"""The main job: serve the bundled SmolLM2-135M-Instruct with ``vllm serve ... --kv-cache-dtype rotkv2``.

    python -m rotkv_vllm.demo                      # rotkv2, 1 GiB of KV cache, loopback, a free port
    python -m rotkv_vllm.demo --bits 4 --measure-baseline

Steps: convert the bundled model if needed (:mod:`rotkv_vllm.bundled_model`); prepare a serving folder
(links to the model files plus a RotateKV calibration on ``calib_wikitext2_valid.txt``, made once with
``python -m rotkv_vllm.calibration``); start ``vllm serve`` on 127.0.0.1; send one completion and one chat
request; read the KV-cache capacity the engine reports (``vllm:cache_config_info`` on ``/metrics``) and
compare it with bf16 at the same ``VLLM_CPU_KVCACHE_SPACE``; stop the server.

The helpers (:func:`prepare_model`, :class:`VllmServer`) are what the end-to-end tests and the serving
benchmark use too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rotkv_vllm.config import RotateKVConfig

__all__ = ["serving_config", "prepare_model", "prepare_bundled", "VllmServer", "capacity_from_metrics",
           "bf16_capacity_tokens", "default_calib_file", "main"]

logger = logging.getLogger(__name__)

CALIB_FILE_NAME = "calib_wikitext2_valid.txt"


def default_calib_file() -> Path:
    """``calib_wikitext2_valid.txt``, shipped with the package (:mod:`rotkv_data`)."""
    from rotkv_data import data_path

    return data_path(CALIB_FILE_NAME)


def serving_config(bits: int = 2, **overrides: Any) -> RotateKVConfig:
    """The RotateKV config the vLLM backend serves for ``rotkv{bits}``: the library default, except that
    sinks are the first positions (``sink_mode="first"``) when the default picks them from activations,
    which an attention backend cannot see."""
    cfg = RotateKVConfig.for_bits(bits, **overrides)
    if cfg.sink_mode == "topk" and "sink_mode" not in overrides:
        cfg = dataclasses.replace(cfg, sink_mode="first")
    return cfg


def _calibration_matches(folder: Path, config: RotateKVConfig) -> bool:
    from rotkv_vllm.calibration import find_calibration, load_calibration

    if find_calibration(folder) is None:
        return False
    try:
        have = load_calibration(folder)
    except ValueError:
        return False
    # A calibration without a weight fingerprint predates rotkv_vllm.fingerprint: make it anew.
    return have.config.to_dict() == config.to_dict() and "weight_fingerprint" in have.model_info


def prepare_model(src: str | os.PathLike, dest: str | os.PathLike, config: RotateKVConfig, *,
                  calib_file: str | os.PathLike | None = None, num_sequences: int = 16, seq_len: int = 512,
                  tensor_parallel_size: int = 1) -> Path:
    """A folder serving ``src``'s weights with a RotateKV calibration for ``config``.

    ``dest`` gets symbolic links to ``src``'s files (the weights are not copied) and, unless it already
    holds a calibration made with exactly ``config``, a new one from
    ``python -m rotkv_vllm.calibration dest --calib-file FILE --config-json ...`` (run as a subprocess, so
    its memory is returned before serving starts).
    """
    src, dest = Path(src), Path(dest)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a model folder (no config.json)")
    dest.mkdir(parents=True, exist_ok=True)
    from rotkv_vllm.calibration import CONFIG_FILE, TENSORS_FILE

    for f in src.iterdir():
        if f.name in (CONFIG_FILE, TENSORS_FILE) or f.name.startswith("."):
            continue
        link = dest / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    if _calibration_matches(dest, config):
        return dest
    calib = Path(calib_file) if calib_file is not None else default_calib_file()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_json = Path(tmp) / "rotkv_config_in.json"
        cfg_json.write_text(config.to_json())
        cmd = [sys.executable, "-m", "rotkv_vllm.calibration", str(dest), "--calib-file", str(calib),
               "--config-json", str(cfg_json), "--num-sequences", str(num_sequences), "--seq-len", str(seq_len),
               "--tensor-parallel-size", str(tensor_parallel_size)]
        logger.info("calibrating: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    if not _calibration_matches(dest, config):
        raise RuntimeError(f"calibration of {dest} did not produce the requested config")
    return dest


def prepare_bundled(model: str = "smollm2", config: RotateKVConfig | None = None) -> Path:
    """The serving folder of a bundled model (``smollm2`` or ``gemma3-270m``, see
    :mod:`rotkv_vllm.bundled_model`; converted first if needed) with a calibration for ``config`` (default
    ``serving_config(2)``, the one every rotkv preset reads) in ``$ROTKV_CACHE/vllm/<model folder>``."""
    from rotkv_vllm.bundled_model import cache_root, ensure_bundled

    src = ensure_bundled(model)
    return prepare_model(src, cache_root() / "vllm" / src.name, config or serving_config(2))


# ---- the server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    exe = Path(sys.executable).with_name("vllm")
    if exe.is_file():
        return str(exe)
    found = shutil.which("vllm")
    if not found:
        raise FileNotFoundError("the `vllm` command is not installed next to this Python: run scripts/setup.sh")
    return found


_CACHE_INFO = re.compile(r'^vllm:cache_config_info\{(?P<labels>[^}]*)\}', re.MULTILINE)


def capacity_from_metrics(metrics: str) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` (the engine's CacheConfig, incl. ``kv_cache_size_tokens``)."""
    m = _CACHE_INFO.search(metrics)
    if m is None:
        raise ValueError("no vllm:cache_config_info in the /metrics text")
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))


class VllmServer:
    """``vllm serve MODEL`` on 127.0.0.1 in its own process group, for a ``with`` block.

    Args:
        kv_cache_space_gib: ``VLLM_CPU_KVCACHE_SPACE`` for the server.
        args: extra ``vllm serve`` arguments.
        log_path: where the server's output goes (default: a temporary file, kept for failures).
    """

    def __init__(self, model: str | os.PathLike, *, kv_cache_dtype: str = "auto", kv_cache_space_gib: int = 1,
                 max_model_len: int = 2048, enforce_eager: bool = True, args: list[str] | tuple = (),
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 900.0):
        self.model, self.kv_cache_dtype = str(model), kv_cache_dtype
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                    "--kv-cache-dtype", kv_cache_dtype, "--max-model-len", str(max_model_len), *map(str, args)]
        if enforce_eager:
            self.cmd.append("--enforce-eager")
        self.env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_space_gib), **(env or {}))
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.leftover = False

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        logger.info("starting: %s", " ".join(self.cmd))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                self.leftover = not self.wait_group_gone(15.0)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._log.close()
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGINT (as Ctrl-C) to the server and wait for it; returns its exit code.

        ``self.leftover`` records whether any process of its group (engine core, workers) outlived it by
        more than a few seconds; those are then killed, so nothing is left running either way.
        """
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("vllm serve did not stop within %.0f s of SIGINT: killing its process group", timeout)
        self.exit_code = self.proc.poll()
        self.leftover = not self.wait_group_gone(10.0)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.exit_code is None:
            self.proc.wait(timeout=30)
        self._log.close()
        return self.exit_code

    def group_alive(self) -> bool:
        """Whether any process of the server's process group still exists."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.group_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    # ---- requests -------------------------------------------------------------------------------
    def request(self, path: str, payload: dict | None = None, timeout: float = 600.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def complete(self, prompt: str, max_tokens: int = 32, **kw) -> dict:
        return self.request("/v1/completions", {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0.0, **kw})

    def chat(self, message: str, max_tokens: int = 48, **kw) -> dict:
        return self.request("/v1/chat/completions", {"model": self.model, "max_tokens": max_tokens,
                                                     "temperature": 0.0,
                                                     "messages": [{"role": "user", "content": message}], **kw})

    def cache_info(self) -> dict[str, str]:
        return capacity_from_metrics(self.request("/metrics"))


def bf16_capacity_tokens(model_dir: str | os.PathLike, kv_cache_space_gib: int, block_size: int = 128) -> int:
    """Tokens vLLM's planner fits in ``kv_cache_space_gib`` GiB with a bf16 cache (its CPU default of
    128-token blocks): ``floor(bytes / (layers * page)) * block_size``, ``page`` from vLLM's own
    ``FullAttentionSpec``. Used when the baseline engine is not started (``--measure-baseline``)."""
    import torch
    from transformers import AutoConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=cfg.num_key_value_heads, head_size=head_dim,
                             dtype=torch.bfloat16)
    blocks = (kv_cache_space_gib << 30) // (cfg.num_hidden_layers * spec.page_size_bytes)
    return int(blocks * block_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rotkv_vllm.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--kv-cache-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE in GiB (default 1)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--calib-file", help=f"calibration text (default: the bundled {CALIB_FILE_NAME})")
    ap.add_argument("--serve-dir", help="serving folder (default: $ROTKV_CACHE/vllm/<model>)")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile the model (slower start)")
    ap.add_argument("--measure-baseline", action="store_true",
                    help="also start a bf16 (--kv-cache-dtype auto) server and read its capacity report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from rotkv_vllm.bundled_model import cache_root, ensure_smollm2

    src = ensure_smollm2()
    dest = Path(args.serve_dir) if args.serve_dir else cache_root() / "vllm" / src.name
    model = prepare_model(src, dest, serving_config(2), calib_file=args.calib_file)
    dtype = f"rotkv{args.bits}"
    print(f"\n== vllm serve {model} --kv-cache-dtype {dtype} (VLLM_CPU_KVCACHE_SPACE={args.kv_cache_space})")
    with VllmServer(model, kv_cache_dtype=dtype, kv_cache_space_gib=args.kv_cache_space,
                    max_model_len=args.max_model_len, enforce_eager=not args.compile) as srv:
        comp = srv.complete("The three primary colors are", max_tokens=32)
        print(f"\ncompletion> The three primary colors are{comp['choices'][0]['text']}")
        chat = srv.chat("What is the capital of France? Answer in one sentence.")
        print(f"chat> {chat['choices'][0]['message']['content']}")
        info = srv.cache_info()
    ours = int(info["kv_cache_size_tokens"])
    code = srv.exit_code
    if args.measure_baseline:
        with VllmServer(model, kv_cache_dtype="auto", kv_cache_space_gib=args.kv_cache_space,
                        max_model_len=args.max_model_len, enforce_eager=not args.compile) as base:
            bf16, how = int(base.cache_info()["kv_cache_size_tokens"]), "engine report"
    else:
        bf16, how = bf16_capacity_tokens(model, args.kv_cache_space), "vLLM's planner arithmetic"
    print(f"\nKV cache capacity in {args.kv_cache_space} GiB: {dtype} {ours:,} tokens (engine report, "
          f"block size {info.get('block_size')}) vs bf16 {bf16:,} tokens ({how}): {ours / bf16:.2f}x")
    print(f"server stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
