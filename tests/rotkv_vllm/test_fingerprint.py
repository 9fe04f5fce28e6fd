"""A RotateKV calibration used with other weights of the same shapes is refused (``rotkv_vllm.fingerprint``): at
vLLM start-up (from the checkpoint files), in the transformers cache and reference, and by ``load_rotkv``."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from rotkv_vllm.calibration import calibrate, load_calibration, save_calibration
from rotkv_vllm.config import RotateKVConfig
from rotkv_vllm.fingerprint import ALLOW_MISMATCH_ENV, checkpoint_fingerprint, fingerprint_layers
from rotkv_vllm.hf_cache import rotkv_cache
from rotkv_vllm.runtime import find_served_calibration

MISMATCH = (r"this RotateKV calibration was made for other weights than .*'s \(k_proj/v_proj fingerprint of layers "
            r"\[0, 1\] differs\)[\s\S]*Recalibrate for these weights: `python -m rotkv_vllm.calibration MODEL_DIR "
            r"--calib-file YOUR_TEXT.txt`; or set ROTKV_ALLOW_WEIGHT_MISMATCH=1 to use it anyway")


@pytest.fixture(scope="module")
def calibrated(tiny_llama, calib_text, tmp_path_factory):
    """The tiny Llama saved with its calibration, and a copy of it whose k_proj of layer 1 was fine-tuned."""
    model, tok = tiny_llama
    cal = calibrate(model, tok, RotateKVConfig(sink_mode="first", group_size=32), text=calib_text, num_sequences=1,
                    seq_len=64, progress=False)
    good = tmp_path_factory.mktemp("good")
    model.save_pretrained(good)
    tok.save_pretrained(good)
    save_calibration(cal, good)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].self_attn.k_proj.weight.mul_(1.01)
    bad = tmp_path_factory.mktemp("bad")
    other.save_pretrained(bad)
    tok.save_pretrained(bad)
    save_calibration(cal, bad)  # the calibration of the first weights, beside the second
    return cal, good, bad, other


def test_calibration_stores_the_checkpoint_fingerprint(calibrated):
    cal, good, _, _ = calibrated
    fp = load_calibration(good).model_info["weight_fingerprint"]
    assert fp["layers"] == fingerprint_layers(2) == [0, 1]
    assert checkpoint_fingerprint(good, fp["layers"]) == fp["sha256"]  # files and loaded weights hash alike


def test_vllm_startup_refuses_other_weights(calibrated, tiny_llama):
    cal, good, bad, _ = calibrated
    hf = tiny_llama[0].config
    assert find_served_calibration(str(good), None, hf, "rotkv2").model_info == load_calibration(good).model_info
    with pytest.raises(ValueError, match=MISMATCH):
        find_served_calibration(str(bad), None, hf, "rotkv2")


def test_transformers_paths_refuse_other_weights(calibrated):
    cal, _, bad, other = calibrated
    with pytest.raises(ValueError, match=MISMATCH):
        cal.check_model(other)
    with pytest.raises(ValueError, match=MISMATCH):
        with rotkv_cache(other, cal):
            pass


def test_load_rotkv_refuses_other_weights(calibrated):
    pytest.importorskip("optimum")
    from optimum_plugin.quantizers import load_rotkv

    _, good, bad, _ = calibrated
    load_rotkv(good)
    with pytest.raises(ValueError, match=MISMATCH):
        load_rotkv(bad)


def test_override_turns_the_refusal_into_a_warning(calibrated, tiny_llama, monkeypatch, caplog):
    cal, _, bad, other = calibrated
    monkeypatch.setenv(ALLOW_MISMATCH_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="rotkv_vllm.fingerprint"):
        find_served_calibration(str(bad), None, tiny_llama[0].config, "rotkv2")
        cal.check_model(other)
    assert caplog.text.count("ROTKV_ALLOW_WEIGHT_MISMATCH=1: used anyway") == 2


def test_old_calibration_without_fingerprint_warns_with_the_command(calibrated, tiny_llama, caplog):
    cal, _, bad, _ = calibrated
    info = {k: v for k, v in cal.model_info.items() if k != "weight_fingerprint"}
    old = dataclasses.replace(cal, model_info=info)
    with caplog.at_level(logging.WARNING, logger="rotkv_vllm.fingerprint"):
        old.check_model(tiny_llama[0])
    assert "has no weight fingerprint" in caplog.text
    assert "python -m rotkv_vllm.calibration MODEL_DIR --calib-file YOUR_TEXT.txt" in caplog.text
