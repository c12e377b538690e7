"""Process launch and model construction, shared by the trainer and the benchmark."""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh

from cpu_kernels import apply_cpu_kernels
from formats.checkpoint import check_same_shape, model_config, read_state, tokenizer_path
from formats.hf import check_config, is_hf_dir
from model.attention import resolve_backend
from model.llama import Transformer
from training.config import TrainConfig, torchrun_world
from training.materialize import materialize
from training.parallelize import parallelize


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stopped being finite, or the other processes never answered)."""


def launch(cfg: TrainConfig) -> Fabric:
    """Fabric with FSDP2 for every world size; under torchrun the process layout comes from its environment."""
    devices, nodes = torchrun_world() or (cfg.devices, cfg.num_nodes)
    accelerator = resolve_accelerator(cfg)
    available = torch.cuda.device_count() if accelerator == "cuda" else os.cpu_count()
    if devices > available:
        raise ValueError(f"devices={devices} but this machine has {available} {accelerator} device(s)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the global generator too starts from the seed (checkpoints save its state)
    if accelerator == "cpu":
        keep_freed_memory()
    if accelerator == "cuda" and cfg.precision == "32-true":
        # fp32 matmuls on TF32 tensor cores (10-bit mantissa products, fp32 accumulation), as every GPU trainer
        # does: full-precision fp32 matmuls run several times slower and buy nothing measurable for training.
        torch.set_float32_matmul_precision("high")
    strategy = ModelParallelStrategy(
        parallelize_fn=functools.partial(shard_model, cfg=cfg),
        data_parallel_size=devices * nodes,
        tensor_parallel_size=1,
        timeout=timedelta(seconds=cfg.dist_timeout),
    )
    # Precision is applied by the model's dtype and FSDP2's MixedPrecisionPolicy, not by Fabric's autocast.
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=nodes, strategy=strategy, precision="32-true")
    if nodes > 1 and torchrun_world() is None and int(os.environ.get("NODE_RANK", "0")) > 0:
        wait_for_master(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "0")), cfg)
    fabric.launch()
    return fabric


def local_ranks(cfg: TrainConfig) -> int:
    """Processes on this machine."""
    return (torchrun_world() or (cfg.devices, cfg.num_nodes))[0]


def resolve_accelerator(cfg: TrainConfig) -> str:
    if cfg.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.accelerator


HEAP_TENSOR_LIMIT = 64 << 20  # CPU tensors up to this size live in glibc's heap; larger ones are their own mmap


def keep_freed_memory() -> None:
    """Serve CPU tensors up to HEAP_TENSOR_LIMIT from glibc's heap and keep freed heap memory instead of returning
    it to the OS; larger tensors are mmapped and returned when freed.

    By default glibc returns freed memory at the heap's top and mmaps ever larger tensors, so each step's
    temporaries (logits, attention scores) page-fault their memory in again, which made memory-bound ops up to 8x
    slower. But a heap that also holds large long-lived tensors fragments: at the 1.1B shapes FSDP2's per-unit
    gradient and all-gather buffers, freed and reallocated around the optimizer state every step, left the heap
    gigabytes larger than its tensors with a 1 GiB limit. Above the limit a tensor's pages come and go with it; below
    it the heap still keeps what it freed, which the memory plan leaves out (docs/performance.md).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, HEAP_TENSOR_LIMIT)
    libc.mallopt(m_trim_threshold, 1 << 31)
    # One heap for every thread: gloo's threads otherwise get heaps of their own, which keep the collectives' freed
    # buffers where the main thread's tensors cannot reuse them.
    libc.mallopt(m_arena_max, 1)


def wait_for_master(host: str, port: int, cfg: TrainConfig) -> None:
    """On a node other than the first (launched without torchrun), wait for node 0's rendezvous store to listen,
    and give up with a clear message after `dist_timeout` seconds instead of a C++ stack trace."""
    deadline = time.monotonic() + cfg.dist_timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TrainingError(
                    f"no rendezvous: nothing answered at {host}:{port} within {cfg.dist_timeout}s"
                ) from None
            time.sleep(1)


def check_attention(cfg: TrainConfig, device: torch.device) -> None:
    """Fail before training when the requested attention backend cannot run here."""
    compute = torch.float32 if cfg.precision == "32-true" else torch.bfloat16
    resolve_backend(cfg.model.attention, device, compute)


def grouped_mm_fits(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the MoE experts run as torch._grouped_mm here, decided once for the run.

    bf16 only: torch's CUDA kernel and its meta function (what torch.compile traces) accept nothing else. On CUDA
    only Hopper (capability 9.x): that is the kernel torch tunes for; on Blackwell (10.x) a PyTorch report shows
    wrong gradients for experts that received no tokens, and elsewhere (8.x, 12.x) torch runs a looped fallback
    that syncs the host anyway. On a CPU torch's kernel keeps the reference MoE free of host syncs, so a compiled
    block stays one graph (the cpu_kernels plug-in replaces it when enabled)."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] == 9
    return device.type == "cpu"


def training_device(cfg: TrainConfig) -> torch.device:
    """This rank's device (after launch: Fabric has set the current CUDA device)."""
    if resolve_accelerator(cfg) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_model(cfg: TrainConfig) -> Transformer:
    """The model on the meta device (no memory yet), with the CPU fast paths swapped in when training on a CPU with
    `cpu_kernels` on (the default), in bf16 for `bf16-true`, its loss carrying the output z-loss of
    `optim.output_z_loss_coef`. Fabric's setup_module then shards it and fills each rank's shards (shard_model, the
    strategy's parallelize_fn)."""
    device = training_device(cfg)
    compute = torch.float32 if cfg.precision == "32-true" else torch.bfloat16
    with torch.device("meta"):
        model = Transformer(cfg.model, grouped_mm=grouped_mm_fits(device, compute))
    if cfg.cpu_kernels and device.type == "cpu":
        apply_cpu_kernels(model)
    model.output_z_loss_coef = cfg.optim.output_z_loss_coef
    return model.to(torch.bfloat16) if cfg.precision == "bf16-true" else model


def shard_model(model: Transformer, mesh: DeviceMesh, cfg: TrainConfig) -> nn.Module:
    """Fabric's parallelize_fn: activation checkpointing, compile and FSDP2 on the meta device, then each rank
    allocates and initialises only its shards (training/materialize.py), so no rank holds the whole model. Fabric's
    own materialisation (reset_parameters) then finds nothing left on the meta device."""
    model = parallelize(model, mesh, cfg.precision, cfg.activation_checkpointing, cfg.compile, cfg.fsdp_replicas)
    materialize(model, training_device(cfg), cfg.seed, cfg.init_from)
    return model


def check_init_from(cfg: TrainConfig) -> None:
    """Fail before launching when `init_from` cannot initialise the configured model: the model section must match
    the Hugging Face config.json or the checkpoint's shapes (a mismatch is an error naming the key)."""
    if not cfg.init_from:
        return
    path = Path(cfg.init_from)
    if is_hf_dir(path):
        check_config(cfg.model, path)
    else:
        check_same_shape(cfg.model, model_config(read_state(path)), path)


def init_from_tokenizer(cfg: TrainConfig) -> Path | None:
    """The tokenizer.model of the `init_from` model (Hugging Face directory or checkpoint), if it has one."""
    if not cfg.init_from:
        return None
    return tokenizer_path(cfg.init_from)  # where both keep it; a checkpoint's is checked against its checksum
