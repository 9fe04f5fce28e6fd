"""The suite's skip policy (tests/conftest.py): under ROTKV_STRICT_SKIPS=1 a skip is a failure unless the test
is marked cuda; every run reports its skips. Checked on a throw-away suite run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

INNER = '''
import pytest

def test_runs():
    assert 1 + 1 == 2

def test_skips_at_run_time():
    pytest.skip("bundled model not converted")

@pytest.mark.cuda
def test_needs_a_gpu():
    import torch
    assert torch.cuda.is_available()

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
'''
INNER_MODULE_SKIP = 'import pytest\npytest.importorskip("a_part_that_is_not_installed")\n\ndef test_x():\n    pass\n'


# the README's test command runs on xdist workers: there the workers police and the controller counts
WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["serial", "xdist"])


def run_inner(tmp_path: Path, strict: bool, workers: int = 0) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "test_missing_part.py").write_text(INNER_MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "ROTKV_STRICT_SKIPS"}
    if strict:
        env["ROTKV_STRICT_SKIPS"] = "1"
    # --continue-on-collection-errors: see every outcome (without it the failed collection stops the run)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           "--continue-on-collection-errors", *(["-n", str(workers)] if workers else []),
                           str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the inner cuda test would run")
@WORKERS
def test_strict_mode_fails_every_skip_but_cuda_ones(tmp_path, workers):
    r = run_inner(tmp_path, strict=True, workers=workers)
    out = r.stdout
    assert r.returncode == 1, out
    assert "FAILED" in out and "test_skips_at_run_time" in out and "bundled model not converted" in out
    assert "ERROR" in out and "a_part_that_is_not_installed" in out  # the module-level importorskip
    assert "1 passed" in out and "1 skipped" in out and "1 xfailed" in out, out.splitlines()[-1]
    assert "1 skipped (ROTKV_STRICT_SKIPS=1" in out and "needs a CUDA GPU" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the inner cuda test would run")
@WORKERS
def test_lenient_mode_counts_and_reports_skips(tmp_path, workers):
    r = run_inner(tmp_path, strict=False, workers=workers)
    out = r.stdout
    assert r.returncode == 0, out
    assert "3 skipped (ROTKV_STRICT_SKIPS unset" in out
    assert "1 x bundled model not converted" in out and "a_part_that_is_not_installed" in out


def test_the_readme_test_command_is_strict():
    script = (Path(__file__).resolve().parents[1] / "scripts" / "test.sh").read_text()
    assert "export ROTKV_STRICT_SKIPS=1" in script
