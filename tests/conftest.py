"""Fixtures shared by every test package, and the suite's skip policy.

Skip policy. ``scripts/test.sh`` (the README's test command, which CI runs) sets ``ROTKV_STRICT_SKIPS=1``:
then every skip is a failure -- a module-level ``importorskip("vllm")`` included -- except the tests marked
``@pytest.mark.cuda`` (they need a CUDA GPU, which a CPU machine lacks). A run whose install lost a part
(vLLM, Triton, the converted model) therefore cannot go green. Every run ends with a "skip policy" section
that counts the skips and gives each reason.

Parallel runs. ``scripts/test.sh`` runs the suite on pytest-xdist workers, one per CPU (at most 4), whole files
per worker (``--dist loadfile``: a module's fixtures -- an engine job, a calibrated folder -- are built once).
Each worker gets its own share of the cores (:func:`_worker_cores`): torch's threads, OpenMP's in every
process it starts, and the core vLLM's CPU engine binds its thread to. Without the split, two workers' OpenMP
barriers spin against each other and both run several times slower. The files marked ``longest`` (several
minutes in one worker), then those marked ``e2e`` or ``slow``, are handed out first, so that no long file starts
last.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch

STRICT_ENV = "ROTKV_STRICT_SKIPS"
_SKIPS: collections.Counter = collections.Counter()  # skip reason -> count, for the summary
CUDA_REASON = "needs a CUDA GPU (marked cuda: the only skip allowed under ROTKV_STRICT_SKIPS=1)"


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") == "1"


def _worker_cores() -> list[int] | None:
    """The cores of this pytest-xdist worker: worker ``i`` of ``n`` gets the ``i``-th of ``n`` equal slices of
    the cores this process may run on (one each on a 2-core machine); ``None`` outside xdist."""
    name, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not name or not count:
        return None
    cpus, n, i = sorted(os.sched_getaffinity(0)), int(count), int(name.removeprefix("gw"))
    per = max(len(cpus) // n, 1)
    lo = (i * per) % len(cpus)
    return cpus[lo:lo + per]


def _pin_worker() -> None:
    cores = _worker_cores()
    if cores is None:
        return
    torch.set_num_threads(len(cores))
    # inherited by every engine, server and CLI a test starts (a test that sets its own binding, like the
    # tensor-parallel one, overrides it in the child's environment)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


def pytest_configure(config):
    config.addinivalue_line("markers", f"cuda: {CUDA_REASON}")
    _pin_worker()


def _rank(item) -> int:
    if item.get_closest_marker("longest") is not None:
        return 0
    return 1 if item.get_closest_marker("e2e") is not None or item.get_closest_marker("slow") is not None else 2


def pytest_collection_modifyitems(config, items):
    # files marked longest, then files with a long test, then the rest (stable: the collection order
    # otherwise); every worker sorts alike, and xdist hands the files out in this order
    rank = {}
    for item in items:
        rank[item.path] = min(rank.get(item.path, 2), _rank(item))
    items.sort(key=lambda item: rank[item.path])
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


def _police(report, item) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if _strict() and not _allowed(item):
        report.outcome = "failed"
        report.longrepr = (f"skipped under {STRICT_ENV}=1, where only tests marked cuda may skip: "
                           f"{_skip_reason(report)}\n(a required part is missing: rerun `bash scripts/setup.sh`)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _police(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _police(outcome.get_result(), None)


# Counted where the reports arrive, after the policing: in the controller under xdist (a skipped test gives
# one skipped report; a policed one arrives failed).
def _count(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS[_skip_reason(report)] += 1


def pytest_runtest_logreport(report):
    _count(report)


def pytest_collectreport(report):
    _count(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = _SKIPS
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
