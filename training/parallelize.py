"""Apply activation checkpointing, per-block compilation and FSDP2 sharding to the decoder, in that order."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from torch.distributed.tensor import Shard

from model.llama import Transformer

# A unit of several modules ([norm, head]) whose head never runs its own forward (the loss reads the head's weight)
# is only handled from torch's pytorch#180428 on; earlier versions mix DTensor shards into the loss.
GROUPS_ALLOW_UNCALLED_MODULES = hasattr(FSDPState, "_force_complete_incomplete_states")


def mixed_precision_policy(precision: str, world_size: int) -> MixedPrecisionPolicy | None:
    """bf16 compute with gradients reduced in fp32; `bf16-mixed` keeps fp32 master weights, `bf16-true` does not
    (and on one rank has nothing to reduce, so it skips the round trip of its gradients through fp32)."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "bf16-true" and world_size > 1:
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return None


def data_parallel_mesh(mesh: DeviceMesh, replicas: int) -> DeviceMesh:
    """The 1-D sharding mesh, or for hybrid sharding a 2-D (replicate, shard) mesh: shards within groups of
    consecutive ranks (a node when `replicas` is the node count), replicas across them.

    The 2-D mesh is built afresh with the public `init_device_mesh` over the whole world, which is the
    data-parallel mesh as long as tensor parallelism is off (DeviceMesh's `_unflatten` of the data-parallel dim
    would be exact for any layout, but it is private and not known to exist in torch 2.11)."""
    dp_mesh = mesh["data_parallel"]
    if replicas == 1:
        return dp_mesh
    if dp_mesh.size() != mesh.size():
        raise ValueError("hybrid sharding (fsdp_replicas > 1) needs tensor_parallel_size 1")
    if dp_mesh.size() % replicas:
        raise ValueError(f"fsdp_replicas ({replicas}) must divide the data-parallel size ({dp_mesh.size()})")
    shape = (replicas, dp_mesh.size() // replicas)
    return init_device_mesh(dp_mesh.device_type, shape, mesh_dim_names=("replicate", "shard"))


def shard_size(dp_mesh: DeviceMesh) -> int:
    """Ranks a parameter is split over (the shard dim of a hybrid mesh)."""
    return dp_mesh["shard"].size() if dp_mesh.ndim == 2 else dp_mesh.size()


def expert_placement(num_experts: int, shards: int) -> Callable[[nn.Parameter], Shard | None] | None:
    """Shard stacked expert weights [E, ...] on dim 1 when there are more shards than experts: on dim 0 each rank
    would be padded to the first chunk's size, and every all-gather would move shards/E times the real data."""
    if num_experts == 0 or shards <= num_experts:
        return None
    return lambda param: Shard(1) if param.ndim == 3 else None  # in a block, only the experts' weights are 3-D


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    precision: str,
    activation_checkpointing: str,
    compile: bool,
    fsdp_replicas: int = 1,
) -> nn.Module:
    """FSDP2 units: each block; the embedding; the final norm with the head; the root (what is left). With tied
    embeddings the embedding and head share a weight and stay together in the root."""
    for i, block in enumerate(model.layers):
        if activation_checkpointing == "full":
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile()
        model.layers[i] = block
    dp_mesh = data_parallel_mesh(mesh, fsdp_replicas)
    mp = mixed_precision_policy(precision, dp_mesh.size())
    kwargs = {"mesh": dp_mesh, "mp_policy": mp} if mp else {"mesh": dp_mesh}
    placement = expert_placement(model.cfg.num_experts, shard_size(dp_mesh))
    untied = not model.cfg.tie_embeddings
    head_unit = untied and GROUPS_ALLOW_UNCALLED_MODULES
    if untied:
        fully_shard(model.tok_embeddings, **kwargs)
    for i, block in enumerate(model.layers):
        # The last unit of forward is needed again first by backward: keep it gathered.
        last = i == len(model.layers) - 1 and not head_unit
        fully_shard(block, reshard_after_forward=not last, shard_placement_fn=placement, **kwargs)
    if head_unit:
        fully_shard([model.norm, model.lm_head], reshard_after_forward=False, **kwargs)
    fully_shard(model, **kwargs)
    return model
