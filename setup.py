"""Build of the optional C++ CPU kernels (``rotkv_kernels._paged_cpu``); everything else is in pyproject.toml.

The extension is built only where torch is importable at build time, so ``pip install .`` in an isolated
build environment (no torch, maybe no compiler) installs the pure-Python package, which runs the PyTorch
paths and says how to build the kernels. ``scripts/setup.sh`` builds them in place after the install:

    python setup.py build_ext --inplace         # MAX_JOBS=1 for one compiler at a time

Three translation units hold the same attention kernel for three ISAs (scalar, AVX2, AVX-512); each gets
its own ``-m`` flags (``ISA_FLAGS``) and the op picks one at run time from the CPU's features. No torch
header is included in those units (``kernels/csrc/rotkv_paged_cpu.h`` says why). The four units compile
``MAX_JOBS`` at a time (default: the CPUs this process may run on); each takes up to a minute of one core.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _jobs() -> int:
    """Compilers run at once: ``$MAX_JOBS`` (torch's variable) or the number of CPUs this process may use."""
    raw = os.environ.get("MAX_JOBS", "").strip()
    if not raw:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MAX_JOBS={raw!r}: expected a positive integer")
    return int(raw)


def _ext_modules():
    if os.environ.get("ROTKV_BUILD_CPU_KERNELS", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # no torch in this build environment: pure-Python install
        return [], {}

    from setuptools.errors import CompileError, ExecError

    class _PerFileFlags(BuildExtension):
        """Adds each ISA translation unit's -m flags (setuptools has one flag list per extension) and runs the
        compilers ``MAX_JOBS`` at a time.

        setuptools compiles an extension's sources one after another (torch's parallel path is ninja, which has
        one flag list too). Here its compile loop runs as usual but only records each command line (torch's
        wrapper and setuptools' up-to-date checks included); the commands then run in a thread pool.
        """

        def build_extension(self, ext):
            compile_one, spawn = self.compiler._compile, self.compiler.spawn

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = list(extra_postargs)
                for suffix, flags in ISA_FLAGS.items():
                    if src.endswith(suffix):
                        extra += flags
                return compile_one(obj, src, ext_, cc_args, extra, pp_opts)

            def compile_all(sources, *args, **kwargs):
                commands = []
                self.compiler.spawn = commands.append
                try:
                    objects = compile_sources(sources, *args, **kwargs)
                finally:
                    self.compiler.spawn = spawn

                def run(cmd):
                    try:
                        spawn(cmd)
                    except ExecError as e:
                        raise CompileError(e) from e

                with ThreadPoolExecutor(_jobs()) as pool:
                    list(pool.map(run, commands))
                return objects

            compile_sources = self.compiler.compile
            self.compiler._compile, self.compiler.compile = _compile, compile_all
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile, self.compiler.compile = compile_one, compile_sources

    src = "kernels/csrc"
    ext = CppExtension(
        "rotkv_kernels._paged_cpu",
        # the longest compiles first (MAX_JOBS at a time): the torch op unit and the AVX-512 kernel
        sources=[f"{src}/rotkv_paged_cpu.cpp", f"{src}/rotkv_paged_cpu_avx512.cpp", f"{src}/rotkv_paged_cpu_avx2.cpp",
                 f"{src}/rotkv_paged_cpu_scalar.cpp"],
        depends=[f"{src}/rotkv_paged_cpu.h", f"{src}/rotkv_paged_cpu_kernel.h", f"{src}/rotkv_paged_cpu_vec.h"],
        # -ffp-contract=off: the write must round like the PyTorch reference (no fused multiply-adds
        # the compiler invents); the kernels' FMAs are explicit intrinsics.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": _PerFileFlags.with_options(use_ninja=False)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
