"""training.parallelize on 4 gloo processes: FSDP2 units, expert weights sharded on dim 1 when there are more ranks
than experts (no padding, same losses as dim 0), and hybrid sharding (same losses again); every layout starts from
the same weights, drawn or read from a Hugging Face directory shard by shard (training/materialize.py)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import Shard

import training.parallelize as parallelize_module
from tests.conftest import free_port, initial_weights, tiny_config, write_hf_dir
from training.config import TrainConfig
from training.setup import build_model, shard_model

WORLD = 4
STEPS = 3
SEED = 0
MOE = dict(num_experts=2, top_k=2)


def sharded(
    fsdp_replicas: int = 1, expert_layout: str = "auto", init_from: Path | None = None, **model
) -> torch.nn.Module:
    """The model as train.py builds it (meta device, AC/compile/FSDP2, then materialised shard by shard)."""
    cfg = TrainConfig(model=tiny_config(**model), seed=SEED, fsdp_replicas=fsdp_replicas, init_from=init_from)
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    layout = mock.patch.object(parallelize_module, "expert_placement", lambda *_: None)
    with layout if expert_layout == "dim 0" else contextlib.nullcontext():
        return shard_model(build_model(cfg), mesh, cfg)


def assert_whole_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    whole = {name: tensor.full_tensor() for name, tensor in model.state_dict().items()}
    assert whole.keys() == expected.keys()
    assert all(torch.equal(whole[name], expected[name]) for name in expected)


def losses(model: torch.nn.Module) -> list[float]:
    """A few AdamW steps on this rank's own tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 512, (STEPS, 2, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    out = []
    for batch in tokens:
        result = model(batch[:, :-1], batch[:, 1:])
        loss = result.loss + result.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


def check_units() -> None:
    model = sharded()
    assert all(isinstance(m, FSDPModule) for m in (model.tok_embeddings, *model.layers, model.lm_head, model))
    if parallelize_module.GROUPS_ALLOW_UNCALLED_MODULES:
        assert fully_shard.state(model.norm) is fully_shard.state(model.lm_head)
        assert fully_shard.state(model.lm_head) is not fully_shard.state(model)
    tied = sharded(tie_embeddings=True)
    assert not isinstance(tied.tok_embeddings, FSDPModule) and not isinstance(tied.lm_head, FSDPModule)


def check_expert_layouts(hf_dir: Path) -> None:
    by_dim1, by_dim0 = sharded(**MOE), sharded(expert_layout="dim 0", **MOE)
    experts = by_dim1.layers[0].ffn
    for name in ("gate_proj", "up_proj", "down_proj"):
        param = getattr(experts, name)
        assert param.placements == (Shard(1),)
        assert param.to_local().shape[1] * WORLD == param.shape[1]  # even shards: nothing padded
    assert by_dim0.layers[0].ffn.gate_proj.to_local().shape[0] == (1 if dist.get_rank() < 2 else 0)
    hybrid = sharded(fsdp_replicas=2, **MOE)
    assert hybrid.layers[0].ffn.gate_proj.device_mesh.mesh_dim_names == ("replicate", "shard")
    start = initial_weights(tiny_config(**MOE), SEED)
    for model in (by_dim1, by_dim0, hybrid):
        assert_whole_weights(model, start)
    for layout in ("auto", "dim 0"):  # dim 1: every rank reads its rows of each expert; dim 0: ranks 2, 3 none
        assert_whole_weights(sharded(expert_layout=layout, init_from=hf_dir, **MOE), source_weights())
    reference = losses(by_dim0)
    torch.testing.assert_close(losses(by_dim1), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(losses(hybrid), reference, rtol=0, atol=1e-6)


def source_weights() -> dict[str, torch.Tensor]:
    return initial_weights(tiny_config(**MOE), seed=1)


def worker(rank: int, port: int, hf_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        check_units()
        check_expert_layouts(hf_dir)
    finally:
        dist.destroy_process_group()


def test_units_expert_sharding_and_hybrid_sharding_on_four_processes(tmp_path):
    hf_dir = write_hf_dir(tiny_config(**MOE), source_weights(), tmp_path / "hf")
    mp.spawn(worker, args=(free_port(), hf_dir), nprocs=WORLD)
