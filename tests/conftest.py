"""Fixtures shared by every test package, and the suite's skip policy.

Skip policy. ``scripts/test.sh`` (the README's test command, which CI runs) sets ``ROTKV_STRICT_SKIPS=1``:
then every skip is a failure -- a module-level ``importorskip("vllm")`` included -- except the tests marked
``@pytest.mark.cuda`` (they need a CUDA GPU, which a CPU machine lacks). A run whose install lost a part
(vLLM, Triton, the converted model) therefore cannot go green. Every run ends with a "skip policy" section
that counts the skips and gives each reason.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch

STRICT_ENV = "ROTKV_STRICT_SKIPS"
CUDA_REASON = "needs a CUDA GPU (marked cuda: the only skip allowed under ROTKV_STRICT_SKIPS=1)"


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", f"cuda: {CUDA_REASON}")
    config._rotkv_skips = collections.Counter()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=CUDA_REASON))


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # (path, line, "Skipped: reason")
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)


def _allowed(item) -> bool:
    return item is not None and item.get_closest_marker("cuda") is not None and not torch.cuda.is_available()


def _police(report, item, config) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if _strict() and not _allowed(item):
        report.outcome = "failed"
        report.longrepr = (f"skipped under {STRICT_ENV}=1, where only tests marked cuda may skip: {reason}\n"
                           f"(a required part is missing: rerun `bash scripts/setup.sh`)")
        return
    config._rotkv_skips[reason] += 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _police(outcome.get_result(), item, item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _police(outcome.get_result(), None, collector.config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = config._rotkv_skips
    mode = f"{STRICT_ENV}=1: only cuda-marked tests may skip" if _strict() else f"{STRICT_ENV} unset: skips allowed"
    terminalreporter.section("skip policy")
    terminalreporter.write_line(f"{sum(skips.values())} skipped ({mode})")
    for reason, n in skips.most_common():
        terminalreporter.write_line(f"  {n} x {reason}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread, restored afterwards.

    Small matmuls gain nothing from a second thread, and on cores shared with other jobs OpenMP's spinning
    barriers make two threads several times slower than one. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
