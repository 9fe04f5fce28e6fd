#!/usr/bin/env bash
# Issue 4's GPU check, in one command (under 8 minutes on one H200): the paged-kernel tests on CUDA, then
# benchmarks/gpu_decode.py (rotkv2 decode vs bf16 paged attention vs SDPA, write kernel, FWHT alone).
#
#   bash benchmarks/gpu_check.sh          # from the repository root, on the GPU machine
#
# Writes under $OUT (./out when OUT is unset): env.txt, pytest.log, junit.xml, bench.log, gpu_decode.json
# and, while time is left, bench_{w4,n32}.log / gpu_decode_{w4,n32}.json (32K rows with other tile settings).
# The benchmark's table is printed last. Exit status: non-zero if the tests or the main benchmark failed.
#
# Python and packages. The script runs the machine's own python3 ($PYTHON to override) and does not install
# rotkv: it puts kernels/ on the path under its import name (rotkv_kernels). The GPU image this workplace
# lends (as documented by the workplace, read 2026-11) already holds everything the kernels, their tests and
# the benchmark import: torch 2.11 (CUDA 13), triton 3.6, numpy, pytest, pytest-timeout. So by default no
# wheel is needed. Wheels placed in .whl/ are installed first (into /tmp/site, ahead on PYTHONPATH), for a
# machine that lacks one of those or to pin another version. Download them on a machine with registry
# access, from the repository root (.whl/ is git-ignored; carry it with the run):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl pytest-timeout==2.4.0
#
# (add further NAME==VERSION the same way; `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` lists
# what a wheel needs, which --no-deps does not fetch). A carried tree is limited to 64 MiB: torch (~900 MB),
# triton (~150 MB) and vLLM's CUDA wheel (~400 MB, which pins torch 2.13) do not fit, so vLLM's own bf16 paged
# kernel cannot be the baseline there; gpu_decode.py then times our bf16 split-K Triton kernel (same block
# size, same split/reduce structure, no dequantization) and names the implementation in its `impl` column.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# pyproject maps the import name rotkv_kernels to the folder kernels/; a link does the same without installing.
mkdir -p /tmp/rotkv_path && ln -sfn "$PWD/kernels" /tmp/rotkv_path/rotkv_kernels
export PYTHONPATH="/tmp/rotkv_path:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # real kernels: the tests' device fixture picks CUDA
export PYTHONUNBUFFERED=1

{
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(0))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness on CUDA: the paged kernels, and the cache/Hadamard kernels they are built from.
timeout 240 "$PY" -m pytest -q -ra -p no:cacheprovider --junitxml="$OUT/junit.xml" \
  tests/kernels/test_rotkv_paged_triton.py tests/kernels/test_rotkv_paged.py \
  tests/kernels/test_rotkv_cache_triton.py tests/kernels/test_hadamard_triton.py 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

# 2. the benchmark (Llama-3-8B shapes, contexts 4K/16K/32K, batches 1/16/64).
timeout 190 "$PY" -m benchmarks.gpu_decode --json "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

# 3. while time is left: tuning leads for the next session, 32K context only (4 warps instead of the default 8
#    per attention program; 32 cached positions per tile instead of 16).
for variant in "w4:--num-warps 4" "n32:--block-n 32"; do
  tag=${variant%%:*}; flags=${variant#*:}
  if [ $(( $(date +%s) - start )) -lt 340 ]; then
    # shellcheck disable=SC2086
    timeout 70 "$PY" -m benchmarks.gpu_decode --contexts 32768 --batches 1,64 $flags \
      --json "$OUT/gpu_decode_$tag.json" >"$OUT/bench_$tag.log" 2>&1 || echo "variant $tag failed or timed out"
    grep -A 8 "^\[decode\]" "$OUT/bench_$tag.log" | sed "s/^/$tag: /" || true
  fi
done

echo
echo "=== main table (bench.log) ==="
sed -n '/^\[write\]/,$p' "$OUT/bench.log"
echo "pytest rc=$test_rc  benchmark rc=$bench_rc  elapsed $(( $(date +%s) - start )) s"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
