"""Give a model built on the meta device and sharded by FSDP2 (training/parallelize.py) its memory and its initial
weights, shard by shard: no rank ever holds more than its own shards plus one whole parameter.

Each rank allocates its shards (`to_empty`), recomputes the rotary tables (buffers, not saved) and fills its shards
one parameter at a time from the parameter's whole value: TinyLlama's init drawn from a generator seeded with the
run's seed (every rank draws every whole parameter in turn and keeps its slice), a Hugging Face directory (each rank
reads only its slice of each tensor) or one of our checkpoints (torch.distributed.checkpoint reads into the shards).
The weights are thus the same for every world size and shard placement (dim 0, dim 1 for MoE experts, hybrid
meshes), and on a CPU they are the plain model's after `init_weights(torch.Generator().manual_seed(seed))` (a GPU's
generator draws other numbers). DTensor's own random ops are not used: on a CPU their values depend on the world
size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor, Shard

from formats.checkpoint import check_same_shape, dcp_load, model_config, read_state
from formats.hf import SliceReader, hf_weight_reader, is_hf_dir
from model.llama import Transformer, init_parameter_


def local_slice(param: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's part of `param` lies in the whole tensor. FSDP2 splits a sharded dim as torch.chunk does:
    ceil(size / shards) rows per rank, the last ranks' shorter or empty; a replicated mesh dim takes it whole, and
    so does a plain tensor."""
    index = [slice(None)] * param.ndim
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        for mesh_dim, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                size = param.shape[placement.dim]
                rows = -(-size // mesh.size(mesh_dim))
                start = min(mesh.get_local_rank(mesh_dim) * rows, size)
                index[placement.dim] = slice(start, min(start + rows, size))
    return tuple(index)


def local_part(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def plain_name(name: str) -> str:
    """The parameter's name in the unwrapped model (activation checkpointing inserts a module level)."""
    return name.replace(_CHECKPOINT_PREFIX, "")


@torch.no_grad()
def fill_shards(model: torch.nn.Module, values: SliceReader) -> None:
    """Copy into each parameter's local part the values of its slice, one parameter at a time, in
    named_parameters' order (a tied weight once)."""
    for name, param in model.named_parameters():
        local = local_part(param)
        part = values(plain_name(name), param.shape, local_slice(param))
        if part.shape != local.shape:
            raise RuntimeError(f"{name}: {list(part.shape)} values for a local shard of {list(local.shape)}")
        local.copy_(part)


def random_values(model: Transformer, seed: int, device: torch.device) -> SliceReader:
    """TinyLlama's init: each whole parameter drawn in turn (in fp32, then rounded to the parameter's dtype by the
    copy) from one generator seeded with `seed`, into one buffer the size of the largest: a fresh tensor each time
    fragments the CPU heap (seen here: up to a second largest parameter's worth of extra memory)."""
    generator = torch.Generator(device).manual_seed(seed)
    buffer = torch.empty(max(p.numel() for p in model.parameters()), device=device)

    def values(name: str, shape: torch.Size, index: tuple[slice, ...]) -> torch.Tensor:
        whole = init_parameter_(buffer[: shape.numel()].view(shape), name, model.cfg, generator)
        return whole[index]

    return values


def load_checkpoint_shards(model: torch.nn.Module, path: Path) -> None:
    """The weights of one of our checkpoints (written by any number of ranks): torch.distributed.checkpoint reads
    each rank's shards straight into them."""
    check_same_shape(model.cfg, model_config(read_state(path)), path)
    dcp_load({"model": model.state_dict()}, path)


def materialize(model: Transformer, device: torch.device, seed: int, init_from: str | None = None) -> None:
    """Allocate `model`'s shards on `device` and fill them: from `init_from` (a Hugging Face directory or one of our
    checkpoints) when given, else with TinyLlama's init from `seed`."""
    model.to_empty(device=device)
    model.tie_weights()  # FSDP2 keeps a tied weight tied through to_empty; a plain module would not
    model.init_rope()
    if init_from is None:
        fill_shards(model, random_values(model, seed, device))
    elif is_hf_dir(Path(init_from)):
        with hf_weight_reader(init_from, model.cfg) as read:
            fill_shards(model, read)
    else:
        load_checkpoint_shards(model, Path(init_from))
