"""Without Triton: every module imports, the stubs raise a clear error, the dispatch uses the reference.
With Triton but without ``TRITON_INTERPRET``, CPU tensors also go to the reference.

Runs in a fresh interpreter where ``import triton`` fails (``sys.modules['triton'] = None``), with
``TRITON_INTERPRET=1`` still set, so the dispatch must notice that Triton is missing rather than trust the
environment variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # import triton -> ImportError
    import torch
    import rotkv_kernels
    assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None], "package import pulled triton"
    from rotkv_kernels import hadamard_triton, quant_triton, rotkv_cache_triton
    from rotkv_kernels.rotkv_cache import use_triton, rotkv_write_ref, rotkv_read_ref
    assert not hadamard_triton.HAS_TRITON and not quant_triton.HAS_TRITON and not rotkv_cache_triton.HAS_TRITON
    assert not rotkv_kernels.triton_available()
    x = torch.randn(3, 3, 64)
    calls = [
        lambda: rotkv_kernels.hadamard_transform_triton(x),
        lambda: rotkv_kernels.quantize_pack_triton(x, 2, 64),
        lambda: rotkv_kernels.unpack_dequantize_triton(x, x, x, 2, 64),
        lambda: rotkv_kernels.rotkv_write_triton(x, bits=2, group_size=64, rot_width=64),
        lambda: rotkv_kernels.rotkv_read_triton(x, num_heads=3, head_dim=64, bits=2, group_size=64, rot_width=64),
    ]
    for call in calls:
        try:
            call()
        except NotImplementedError as e:
            assert "needs Triton, which is not installed" in str(e), e
        else:
            raise AssertionError("stub did not raise")
    assert not use_triton(x)
    kw = dict(bits=2, group_size=64, rot_width=192)
    rec = rotkv_kernels.rotkv_write(x, **kw)
    assert torch.equal(rec, rotkv_write_ref(x, **kw))
    rk = dict(num_heads=3, head_dim=64, **kw)
    assert torch.equal(rotkv_kernels.rotkv_read(rec, **rk), rotkv_read_ref(rec, **rk))
    print("OK")
    """
)


def test_modules_import_and_stub_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_package_import_does_not_import_triton():
    code = "import sys, rotkv_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


DISPATCH_SCRIPT = textwrap.dedent(
    """
    import torch
    from rotkv_kernels.rotkv_cache import use_triton, rotkv_read, rotkv_read_ref, rotkv_write, rotkv_write_ref
    x = torch.randn(3, 3, 64)
    assert not use_triton(x)
    kw = dict(bits=2, group_size=192, rot_width=192, clip_ratio=0.8)
    rec = rotkv_write(x, **kw)
    assert torch.equal(rec, rotkv_write_ref(x, **kw))
    rk = dict(num_heads=3, head_dim=64, bits=2, group_size=192, rot_width=192)
    assert torch.equal(rotkv_read(rec, **rk), rotkv_read_ref(rec, **rk))
    print("OK")
    """
)


def test_cpu_dispatch_without_interpreter_is_the_reference():
    # In a subprocess: triton.language must not be first imported with TRITON_INTERPRET=0 in the test process
    # (its own @jit helpers such as tl.max would then not be interpretable there).
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", DISPATCH_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
