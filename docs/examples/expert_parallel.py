"""Expert parallelism: a transformers MoE block's experts sharded over 2 processes.

Each process holds the same block (the same seed), shards its experts with moe_ops.parallelize_experts
(rank r keeps experts [r E / 2, (r + 1) E / 2) as DTensor shards), compiles it and runs its own tokens:
the tokens travel to the ranks holding their experts and back. Each rank's output equals the unsharded
block's on its tokens. Here the processes use gloo on the CPU; on GPUs the same code runs with NCCL
(init_process_group("nccl"), init_device_mesh("cuda", ...)).
"""

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.distributed.device_mesh import init_device_mesh
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moe_ops

H, F, E, K = 32, 24, 8, 2


def block():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E,
                                         num_experts_per_tok=K, norm_topk_prob=True)
    config._experts_implementation = "grouped_mm"
    moe = Qwen3MoeSparseMoeBlock(config)
    for parameter in moe.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return moe


def run(rank, world_size, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        sharded = moe_ops.parallelize_experts(block(), mesh, dispatch="padded")
        compiled = torch.compile(sharded, fullgraph=True)
        x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(rank))  # this rank's tokens
        out = compiled(x)
        want = block()(x)  # the whole block, unsharded, on the same tokens
        error = ((out - want).abs().max() / want.abs().max()).item()
        print(f"rank {rank}: {sharded.experts.gate_up_proj.to_local().shape[0]} of {E} experts here, "
              f"relative difference from the unsharded block {error:.1e}")
        assert error < 1e-5
    finally:
        dist.destroy_process_group()
        time.sleep(0.1)  # gloo's worker threads may still drop tensors while Python exits (docs/index.md)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(run, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)
