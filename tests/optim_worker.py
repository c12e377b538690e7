"""Run under torchrun (4 gloo processes) by test_optim.py: Muon on FSDP2-sharded models against the same optimizer
on an unsharded copy in one process, with the same gradients. Exits non-zero on a mismatch.

Cases: a dense model whose FFN rows (130) split unevenly over 4 ranks (33, 33, 33, 31); a MoE whose 2 stacked
experts are sharded on dim 1 (more shards than experts, training/parallelize.py; FSDP2 needs that dim even); a
dense model on a 2-D hybrid mesh (2 replicas x 2 shards)."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from model.config import ModelConfig
from model.llama import Transformer
from training.config import OptimConfig
from training.optim import make_optimizer
from training.parallelize import parallelize

SHAPES = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=32)
CASES = {  # name: (ffn_dim, num_experts, fsdp_replicas)
    "dense, uneven rows": (130, 0, 1),
    "moe, experts on dim 1": (132, 2, 1),
    "dense, hybrid 2 x 2": (130, 0, 2),
}
STEPS = 3


def gradients(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in model.named_parameters()}


def step_with(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        g = grads[name]
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_case(name: str, ffn_dim: int, num_experts: int, replicas: int) -> None:
    torch.manual_seed(0)
    reference = Transformer(ModelConfig(**SHAPES, ffn_dim=ffn_dim, num_experts=num_experts))
    sharded = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    parallelize(sharded, mesh, "32-true", "none", False, fsdp_replicas=replicas)
    cfg = OptimConfig(name="muon", lr=1e-2)
    optimizers = [make_optimizer(m, cfg, torch.device("cpu")) for m in (reference, sharded)]
    for opt in optimizers:
        opt.ns_dtype = torch.float32  # exact enough to compare tightly
    if num_experts:
        assert sharded.layers[0].ffn.gate_proj.placements[-1] == Shard(1), "experts not sharded on dim 1"
    for step in range(STEPS):
        grads = gradients(reference, step)
        for model, opt in zip((reference, sharded), optimizers):
            step_with(model, opt, grads)
    expected = dict(reference.named_parameters())
    for pname, p in sharded.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if not torch.allclose(full, expected[pname], rtol=1e-5, atol=1e-6):
            diff = (full - expected[pname]).abs().max().item()
            raise AssertionError(f"{name}: {pname} differs from one process by {diff}")


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for name, case in CASES.items():
            run_case(name, *case)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
