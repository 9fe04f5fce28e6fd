"""HALO with the Hugging Face Trainer, gradient checkpointing and PEFT LoRA, on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_plugin.halo.apply import apply_halo, get_halo_config, halo_modules
from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.linear import HALOLinear


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def _batch(n=4, seq=24, seed=1):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_identical_gradients():
    """The recomputed forward quantizes the same values to the same codes, so checkpointing changes nothing."""
    model = apply_halo(tiny_llama(), HALOConfig(level=2, token_block_size=16))
    model.train()
    ids = _batch()
    loss0, g0 = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    loss1, g1 = _grads(model, ids)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)


class _Repeat(torch.utils.data.Dataset):
    """One fixed set of sequences, repeated: a tiny model can fit it within a few dozen steps."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = self.ids[i % self.ids.shape[0]]
        return {"input_ids": x, "labels": x}


def _train_with_trainer(model, tmp_path, steps=30):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Repeat(_batch(n=4, seq=16)))
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_trains_halo_model_like_full_precision(tmp_path):
    halo = apply_halo(tiny_llama(), HALOConfig(level=2, token_block_size=16))
    trainer, halo_losses = _train_with_trainer(halo, tmp_path / "halo")
    _, fp_losses = _train_with_trainer(tiny_llama(), tmp_path / "fp")
    assert len(halo_losses) == 30
    # it learns: the mean of the last 5 logged losses is well below the first
    assert sum(halo_losses[-5:]) / 5 < 0.7 * halo_losses[0]
    # and tracks the float32 run (int8 noise is ~1% per GEMM; allow 10% on the final loss)
    assert abs(sum(halo_losses[-5:]) - sum(fp_losses[-5:])) / sum(fp_losses[-5:]) < 0.10
    assert halo_modules(trainer.model) and get_halo_config(trainer.model).level == 2
    # what the Trainer saves loads into a plain model with the same weights
    trainer.save_model(str(tmp_path / "saved"))
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32)
    for n, p in halo.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[n], p, rtol=0, atol=0, msg=n)


def test_peft_lora_on_halo_base():
    peft = pytest.importorskip("peft")
    from optimum_plugin.halo.training import halo_summary, prepare_halo_lora

    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = prepare_halo_lora(base, HALOConfig(level=1), lora)
    s = halo_summary(model)
    # 7 linears x 2 layers are HALO; all frozen; adapters are plain float32 linears
    assert s["halo_layers"] == 14 and s["frozen_halo_layers"] == 14
    adapters = [m for n, m in model.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"])]
    assert adapters and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in adapters)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, HALOLinear)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _batch(n=4, seq=16)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # frozen base weights untouched; the quantized copy was made once and reused
    after = model.base_model.model.state_dict()
    for n, p in before.items():
        key = n.replace(".weight", ".base_layer.weight") if n.endswith(("q_proj.weight", "v_proj.weight",
                                                                      "down_proj.weight")) else n
        assert torch.equal(after[key], p), n
    assert q.base_layer._frozen_key is not None
    # merging folds the adapters into the frozen weights in place: the cached quantized copy is redone
    with torch.no_grad():
        y_adapter = model(input_ids=ids).logits
    key_before = q.base_layer._frozen_key
    merged = model.merge_and_unload()
    q_merged = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_merged, HALOLinear)
    with torch.no_grad():
        y_merged = merged(input_ids=ids).logits
    assert q_merged._frozen_key != key_before
    # int8 noise of a 2-layer model (~1-2% per GEMM) bounds the gap between the two forwards
    assert float((y_merged - y_adapter).norm() / y_adapter.norm()) < 0.05
