"""No silently wrong HALO W8A8 model: every loading route gives the right model or an error naming the fix.

transformers ignores compressed-tensors' ``transform_config``: typed as its base model, a W8A8 export would load
with plain ``from_pretrained`` with every layer's Hadamard input transform dropped (relative logit error ~0.9
on the tiny model below). Each route runs in a fresh interpreter, so no registration made by another test (or
by vLLM's plugins in this process) can hide a refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from optimum_plugin.halo.apply import apply_halo
from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.export import load_w8a8, save_w8a8
from optimum_plugin.halo.w8a8_config import BASE_TYPE_KEY, INSTALL_HINT, W8A8_MODEL_TYPE

from test_halo_export import IDS, tiny_llama  # noqa: E402  (tests/optimum_plugin is on sys.path)


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    out = save_w8a8(apply_halo(tiny_llama(), HALOConfig(level=1)), tmp_path_factory.mktemp("w8a8") / "ckpt",
                    dtype=torch.float32)
    with torch.no_grad():
        ref = load_w8a8(out)(input_ids=IDS).logits
    torch.save(ref, out.parent / "ref.pt")
    return out


def run_py(code: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=full, timeout=600)


def test_checkpoint_is_typed_halo_w8a8_and_carries_its_loader(w8a8):
    cfg = json.loads((w8a8 / "config.json").read_text())
    assert cfg["model_type"] == W8A8_MODEL_TYPE and cfg[BASE_TYPE_KEY] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]  # what vLLM picks its model class from
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (w8a8 / "configuration_halo_w8a8.py").is_file() and (w8a8 / "modeling_halo_w8a8.py").is_file()


def test_plain_from_pretrained_refuses(w8a8):
    r = run_py(f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(w8a8)!r})")
    assert r.returncode != 0
    assert "trust_remote_code=True" in r.stderr and "ValueError" in r.stderr


def test_trust_remote_code_loads_the_right_model(w8a8):
    code = (f"import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(w8a8)!r}, trust_remote_code=True)\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            f"ref = torch.load({str(w8a8.parent / 'ref.pt')!r})\n"
            f"with torch.no_grad(): out = m(input_ids=ids).logits\n"
            f"print('MAXDIFF', float((out - ref).abs().max()), type(m.model.layers[0].mlp.down_proj).__name__)")
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("MAXDIFF"))
    _, diff, layer = line.split()
    assert float(diff) == 0.0 and layer == "W8A8Linear"  # the same module and maths as load_w8a8


def test_without_rotkv_the_remote_code_names_the_install(w8a8):
    # sys.modules[name] = None makes `import optimum_plugin...` raise ImportError, as if rotkv were absent
    code = ("import sys; sys.modules['optimum_plugin'] = None\n"
            f"from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(w8a8)!r}, trust_remote_code=True)")
    r = run_py(code)
    assert r.returncode != 0 and "pip install rotkv" in r.stderr and INSTALL_HINT[:60] in r.stderr


VLLM_CONFIG = "from vllm.transformers_utils.config import get_config; c = get_config({path!r}, trust_remote_code={trc})\n" \
              "print('CONFIG', type(c).__name__, c.architectures[0], c.quantization_config['quant_method'])"


def test_vllm_without_the_halo_plugin_refuses(w8a8):
    pytest.importorskip("vllm")
    # VLLM_PLUGINS names the general plugins vLLM loads: only rotkv's, not halo's
    r = run_py(VLLM_CONFIG.format(path=str(w8a8), trc=False), env={"VLLM_PLUGINS": "rotkv"})
    assert r.returncode != 0 and "trust_remote_code=True" in r.stderr
    r = run_py("import sys; sys.modules['optimum_plugin'] = None\n" + VLLM_CONFIG.format(path=str(w8a8), trc=True),
               env={"VLLM_PLUGINS": "rotkv"})
    assert r.returncode != 0 and "pip install rotkv" in r.stderr


def test_vllm_with_the_halo_plugin_reads_the_base_model(w8a8):
    pytest.importorskip("vllm")
    r = run_py("from vllm.plugins import load_general_plugins; load_general_plugins()\n"
               + VLLM_CONFIG.format(path=str(w8a8), trc=False))
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("CONFIG"))
    assert line.split()[1:] == ["HALOW8A8LlamaConfig", "LlamaForCausalLM", "compressed-tensors"]
