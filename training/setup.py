"""Process launch and model construction, shared by the trainer and the benchmark."""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy

from model.attention import resolve_backend
from model.checkpoint import check_same_shape, dcp_load, model_config, read_state
from model.llama import Transformer
from training.config import TrainConfig, torchrun_world
from training.parallelize import parallelize


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stopped being finite, or the other processes never answered)."""


def launch(cfg: TrainConfig) -> Fabric:
    """Fabric with FSDP2 for every world size; under torchrun the process layout comes from its environment."""
    devices, nodes = torchrun_world() or (cfg.devices, cfg.num_nodes)
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    available = torch.cuda.device_count() if accelerator == "cuda" else os.cpu_count()
    if devices > available:
        raise ValueError(f"devices={devices} but this machine has {available} {accelerator} device(s)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    strategy = ModelParallelStrategy(
        parallelize_fn=functools.partial(
            parallelize,
            precision=cfg.precision,
            activation_checkpointing=cfg.activation_checkpointing,
            compile=cfg.compile,
        ),
        data_parallel_size=devices * nodes,
        tensor_parallel_size=1,
        timeout=timedelta(seconds=cfg.dist_timeout),
    )
    # Precision is applied by the model's dtype and FSDP2's MixedPrecisionPolicy, not by Fabric's autocast.
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=nodes, strategy=strategy, precision="32-true")
    try:
        fabric.launch()
    except (RuntimeError, TimeoutError) as e:
        if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise TrainingError(f"no rendezvous with the other processes at {addr} in {cfg.dist_timeout}s") from None
        raise
    return fabric


def check_attention(cfg: TrainConfig, device: torch.device) -> None:
    """Fail before training when the requested attention backend cannot run here."""
    compute = torch.float32 if cfg.precision == "32-true" else torch.bfloat16
    resolve_backend(cfg.model.attention, device, compute)


def build_model(cfg: TrainConfig) -> Transformer:
    """The same initial weights on every rank, whatever the world size: FSDP2 then keeps each rank's shard."""
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    if cfg.init_from:
        load_initial_weights(model, Path(cfg.init_from))
    return model.to(torch.bfloat16) if cfg.precision == "bf16-true" else model


def load_initial_weights(model: Transformer, path: Path) -> None:
    """Start from the weights of a Hugging Face model directory or of one of our checkpoints (fine-tuning)."""
    if (path / "config.json").is_file():
        from model.hf import load_hf_weights

        load_hf_weights(model, path)
        return
    state = read_state(path)
    check_same_shape(model.cfg, model_config(state), path)
    dcp_load({"model": model.state_dict()}, path)
