"""Worker for test_halo_fsdp.py: one rank of a 2-process (gloo, CPU) FSDP2 run of a tiny HALO Llama.

    python halo_fsdp_worker.py RANK WORLD_SIZE STORE_FILE OUT_JSON

For each mode it builds the same model, trains 3 AdamW steps on one batch shared by all ranks
(FSDP's averaged gradient then equals the single-process gradient), and on rank 0 also trains an
unsharded copy. Writes losses and HQ-FSDP all-gather byte counts as JSON.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_plugin.halo.apply import apply_halo
from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.fsdp import all_gather_bytes, prepare_hq_fsdp

STEPS = 3
MODES = {
    "fsdp": dict(level=2, granularity="row", hq_fsdp=False),
    "hq_row": dict(level=2, granularity="row", hq_fsdp=True),
    "hq_tensor": dict(level=1, granularity="tensor", hq_fsdp=True),
}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def train(model, ids) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    result = {}
    for mode, kw in MODES.items():
        model = apply_halo(tiny_model(), HALOConfig(token_block_size=16, **kw))
        single = copy.deepcopy(model) if rank == 0 else None
        if kw["hq_fsdp"]:
            prepare_hq_fsdp(model, world)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        all_gather_bytes(reset=True)
        losses = train(model, ids)
        rows = {n: m.weight.shape for n, m in model.named_modules() if hasattr(m, "halo_config")}
        result[mode] = {
            "losses": losses,
            "gathered_bytes": all_gather_bytes(),
            # (local rows, in_features) of every HALO weight on this rank
            "shard_shapes": [list(s) for s in rows.values()],
        }
        if rank == 0:
            result[mode]["single_losses"] = train(single, ids)
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
