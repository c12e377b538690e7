"""Apply activation checkpointing, per-block compilation and FSDP2 sharding to the decoder, in that order."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.llama import Transformer


def mixed_precision_policy(precision: str, world_size: int) -> MixedPrecisionPolicy | None:
    """bf16 compute with gradients reduced in fp32; `bf16-mixed` keeps fp32 master weights, `bf16-true` does not
    (and on one rank has nothing to reduce, so it skips the round trip of its gradients through fp32)."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "bf16-true" and world_size > 1:
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return None


def parallelize(
    model: Transformer, mesh: DeviceMesh, precision: str, activation_checkpointing: str, compile: bool
) -> nn.Module:
    """FSDP2 over the data-parallel mesh: each block is one unit (gathered for its forward and backward), the
    embeddings, final norm and head form the root unit."""
    for i, block in enumerate(model.layers):
        if activation_checkpointing == "full":
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile()
        model.layers[i] = block
    dp_mesh = mesh["data_parallel"]
    mp = mixed_precision_policy(precision, dp_mesh.size())
    kwargs = {"mesh": dp_mesh, "mp_policy": mp} if mp else {"mesh": dp_mesh}
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model
