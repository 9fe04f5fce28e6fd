"""Build of the optional C++ CPU kernels (``rotkv_kernels._paged_cpu``); everything else is in pyproject.toml.

The extension is built only where torch is importable at build time, so ``pip install .`` in an isolated
build environment (no torch, maybe no compiler) installs the pure-Python package, which runs the PyTorch
paths and says how to build the kernels. ``scripts/setup.sh`` builds them in place after the install:

    MAX_JOBS=1 python setup.py build_ext --inplace

Three translation units hold the same attention kernel for three ISAs (scalar, AVX2, AVX-512); each gets
its own ``-m`` flags (``ISA_FLAGS``) and the op picks one at run time from the CPU's features. No torch
header is included in those units (``kernels/csrc/rotkv_paged_cpu.h`` says why).
"""

from __future__ import annotations

import os

from setuptools import setup

ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _ext_modules():
    if os.environ.get("ROTKV_BUILD_CPU_KERNELS", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # no torch in this build environment: pure-Python install
        return [], {}

    class _PerFileFlags(BuildExtension):
        """Adds each ISA translation unit's -m flags (setuptools has one flag list per extension)."""

        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = list(extra_postargs)
                for suffix, flags in ISA_FLAGS.items():
                    if src.endswith(suffix):
                        extra += flags
                return compile_one(obj, src, ext_, cc_args, extra, pp_opts)

            self.compiler._compile = _compile
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

    src = "kernels/csrc"
    ext = CppExtension(
        "rotkv_kernels._paged_cpu",
        sources=[f"{src}/rotkv_paged_cpu.cpp", f"{src}/rotkv_paged_cpu_scalar.cpp", f"{src}/rotkv_paged_cpu_avx2.cpp",
                 f"{src}/rotkv_paged_cpu_avx512.cpp"],
        depends=[f"{src}/rotkv_paged_cpu.h", f"{src}/rotkv_paged_cpu_kernel.h", f"{src}/rotkv_paged_cpu_vec.h"],
        # -ffp-contract=off: the write must round like the PyTorch reference (no fused multiply-adds
        # the compiler invents); the kernels' FMAs are explicit intrinsics.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": _PerFileFlags.with_options(use_ninja=False)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
