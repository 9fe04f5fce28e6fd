"""Shared pieces of the Hub and CLI tests: the loopback Hub server, environments pointing at it, subprocess runners.

Subprocess tests (the ``optimum-cli`` commands, the loaders, ``vllm serve``) get the real environment variables
(``HF_ENDPOINT``, ``HF_HOME`` of an empty cache, ``HF_TOKEN``, ``HF_HUB_DISABLE_XET``): huggingface_hub reads them
at import, exactly as for a user. In-process tests start the server after huggingface_hub was imported, so
:func:`point_hub_at` sets the same values where huggingface_hub keeps them (``huggingface_hub.constants``);
no client function is replaced, every request goes over HTTP to the server.

``HF_HUB_DISABLE_XET=1``: with ``hf_xet`` installed, huggingface_hub 2.4 uploads through Xet storage, a chunked
content-addressed protocol this test server does not implement; without it, uploads take the preupload + LFS batch
+ commit path that the server does implement.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from hub_server import HubServer  # noqa: E402

__all__ = ["HubServer", "TOKENS", "WRITE", "READ", "OTHER", "hub_env", "point_hub_at", "run_cli", "run_worker",
           "folder_digest", "WORKER"]

WRITE, READ, OTHER = "hf_alice_write", "hf_alice_read", "hf_bob_write"
TOKENS = {WRITE: ("alice", "write"), READ: ("alice", "read"), OTHER: ("bob", "write")}
WORKER = Path(__file__).with_name("hub_load_worker.py")
BIN = Path(sys.executable).parent


def hub_env(hub: HubServer, hf_home: Path, token: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that uses ``hub`` with an empty cache in ``hf_home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def point_hub_at(monkeypatch, hub: HubServer, hf_home: Path) -> None:
    """In-process: what ``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_DISABLE_XET`` set at import, set for this test."""
    from huggingface_hub import constants

    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``optimum-cli ARGS`` (the console script installed next to this Python), niced, output captured."""
    return subprocess.run(["nice", "-n", "19", str(BIN / "optimum-cli"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_worker(args: list[str], env: dict[str, str], timeout: float = 600) -> dict:
    """Run ``hub_load_worker.py ARGS`` in a fresh process; returns the JSON it prints last."""
    p = subprocess.run(["nice", "-n", "19", sys.executable, str(WORKER), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def folder_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to prove a folder was left untouched)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
