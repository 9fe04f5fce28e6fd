"""Command-line mistakes end in one line on stderr, ``PROG: error: ...``, exit status 1 and no traceback:
``python -m rotkv_vllm.calibration`` and every ``optimum-cli rotkv`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rotkv_vllm.cli import one_line, user_errors_exit

BIN = Path(sys.executable).parent


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL, **kw)


def _assert_one_line_error(p: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and p.stderr.rstrip().endswith(errors[0]), p.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_one_line_collapses_newlines_and_keeps_bugs_loud():
    assert one_line(ValueError("a\n  b\tc\n")) == "a b c"
    with pytest.raises(SystemExit, match=r"^p: error: bad value x$"):
        with user_errors_exit("p"):
            raise ValueError("bad value\nx")
    with pytest.raises(KeyError):  # not a user error: the traceback stays
        with user_errors_exit("p"):
            raise KeyError("bug")


CAL = [sys.executable, "-m", "rotkv_vllm.calibration"]


@pytest.mark.parametrize("case", ["missing-folder", "not-a-model", "missing-calib-file", "missing-config-json",
                                  "bad-config-json"])
def test_calibration_cli_errors(tmp_path, case):
    model = tmp_path / "model"
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 100)
    args = [model, "--calib-file", calib]
    needle = {"missing-folder": f"model folder {model} does not exist",
              "not-a-model": "is not a model folder (no config.json)",
              "missing-calib-file": "--calib-file",
              "missing-config-json": "--config-json",
              "bad-config-json": "key_bits=5"}[case]
    if case != "missing-folder":
        model.mkdir()
    if case in ("missing-calib-file", "missing-config-json", "bad-config-json"):
        (model / "config.json").write_text('{"model_type": "llama"}')
    if case == "missing-calib-file":
        args = [model, "--calib-file", tmp_path / "nope.txt"]
    if case == "missing-config-json":
        args += ["--config-json", tmp_path / "nope.json"]
    if case == "bad-config-json":
        (tmp_path / "cfg.json").write_text('{"key_bits": 5}')
        args += ["--config-json", tmp_path / "cfg.json"]
    _assert_one_line_error(_run(CAL + args), "python -m rotkv_vllm.calibration", needle)


@pytest.mark.parametrize("sub", ["rotatekv", "lrq-dit", "halo-export"])
def test_optimum_cli_missing_model(tmp_path, sub):
    extra = {"rotatekv": ["--calib-file", tmp_path / "c.txt"], "lrq-dit": ["--prompts", "1"], "halo-export": []}[sub]
    p = _run([BIN / "optimum-cli", "rotkv", sub, "-m", tmp_path / "missing", tmp_path / "out", *extra])
    _assert_one_line_error(p, f"optimum-cli rotkv {sub}", "missing")
    assert not (tmp_path / "out").exists()


def test_optimum_cli_push_of_a_missing_folder(tmp_path):
    p = _run([BIN / "optimum-cli", "rotkv", "push", tmp_path / "missing", "alice/x", "--token", "hf_x"])
    _assert_one_line_error(p, "optimum-cli rotkv push", "missing")
