"""Time checkpoint saves of the trainer's own model and optimizer: synchronous against asynchronous.

    python -m bench.checkpoint --config FILE [--key value ...] [--saves 3] [--devices N]

For each mode, one process group trains a step, then saves `--saves` times through training/checkpoint.py's
Checkpointer (a real checkpoint directory under a temporary folder). `stall_s` is how long training waits in
save(): the whole write when synchronous; when asynchronous, the copy of the state to host memory, after which
torch.distributed.checkpoint writes in the background. `complete_s` is from the start of save() until the
checkpoint is complete (renamed into place). Prints one JSON line per mode (rank 0).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from formats.checkpoint import complete_checkpoints
from training.checkpoint import Checkpointer
from training.config import TrainConfig, parse_config
from training.loop import train_step
from training.optim import make_optimizer
from training.setup import build_model, launch


def add_args(parser) -> None:
    parser.add_argument("--saves", type=int, default=3, help="timed saves per mode")


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def time_saves(cfg: TrainConfig, fabric, model, optimizer, batches, async_save: bool, root: Path) -> dict:
    checkpointer = Checkpointer(root, keep_last=1, async_save=async_save, rank=fabric.global_rank, tokenizer=None)
    stalls, completes = [], []
    for step in range(1, cfg.saves + 1):
        train_step(fabric, model, optimizer, batches, 1, cfg.optim.grad_clip, False)
        start = time.perf_counter()
        checkpointer.save(step, model, optimizer, {"step": step, "config": cfg.to_dict()})
        stalls.append(time.perf_counter() - start)
        checkpointer.wait()  # training would go on here; waiting measures when the checkpoint is complete
        fabric.barrier()
        completes.append(time.perf_counter() - start)
    latest = complete_checkpoints(root / "checkpoints")[-1]
    return {
        "mode": "async" if async_save else "sync",
        "stall_s": round(statistics.median(stalls), 3),
        "complete_s": round(statistics.median(completes), 3),
        "checkpoint_mb": round(directory_mb(latest), 1),
    }


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, prog="python -m bench.checkpoint", extra_args=add_args)
    fabric = launch(cfg)
    model = fabric.setup_module(build_model(cfg))
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fabric.device))
    shape = (2 * cfg.saves + 2, cfg.micro_batch_size, cfg.seq_len + 1)
    batches = iter(torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0)))
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir="runs" if Path("runs").is_dir() else None) as tmp:
        root = Path(fabric.broadcast(tmp))
        for async_save in (False, True):
            record = time_saves(cfg, fabric, model, optimizer, batches, async_save, root / str(async_save))
            record.update(params=params, world_size=fabric.world_size, precision=cfg.precision)
            if fabric.global_rank == 0:
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
