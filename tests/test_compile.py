"""One dense and one MoE block compile as a single graph (fullgraph=True), with and without activation
checkpointing, forward and backward: a graph break or a host sync that breaks Dynamo fails here."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model.llama import Block, rope_tables
from tests.conftest import tiny_config


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "moe"])
def test_block_compiles_to_one_graph(num_experts, checkpointing):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=num_experts)
    # The MoE in bf16 on the grouped path, as the builder picks it for bf16 on a CPU (torch._grouped_mm's meta
    # function, which compilation traces, accepts only bf16; in fp32 the experts' loop reads counts on the host).
    dtype = torch.bfloat16 if num_experts else torch.float32
    block = Block(cfg, grouped_mm=True)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    block = block.to(dtype)
    if checkpointing:  # as training/parallelize.py wraps blocks
        block = checkpoint_wrapper(block, preserve_rng_state=False)
    cos, sin = rope_tables(cfg.head_dim, 16, cfg.rope_theta)
    x = torch.randn(2, 16, cfg.dim, dtype=dtype, requires_grad=True)
    # aot_eager traces forward and backward like inductor does, without inductor's slow C++ compilation.
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out, stats = compiled(x, cos, sin)
    loss = out.square().mean() + (stats.balance_loss + stats.z_loss if stats is not None else 0)
    loss.backward()
    eager_out, _ = block(x.detach(), cos, sin)
    torch.testing.assert_close(out, eager_out)
    assert torch.isfinite(x.grad).all() and all(p.grad is not None for p in block.parameters())
