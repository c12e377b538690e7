"""Run under torchrun by test_step_collectives.py: one train_step of a tiny model on 2 gloo processes, counting
the calls to torch.distributed.all_reduce and barrier made while it runs; writes {"all_reduce", "barrier"} per rank.

Only those two module-level functions are counted: FSDP2's all-gathers and reduce-scatters are other collectives,
and clip_grad_norm_ on DTensor gradients reduces the norm through DTensor's functional collectives (the
`full_tensor()` of the norm), not through torch.distributed.all_reduce, so neither shows up in the count. What is
counted is what our step code calls: exactly one all_reduce (the packed scalars) and no barrier."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ModelConfig
from training.config import TrainConfig
from training.loop import train_step
from training.optim import make_optimizer
from training.setup import build_model, launch


def main(out: str, model: str) -> None:
    cfg = TrainConfig(
        model=ModelConfig(**json.loads(model)), devices=2, threads=1, seq_len=16, micro_batch_size=2, dist_timeout=60
    )
    cfg.global_batch_size = 8  # 2 micro-batches per rank: the gradient accumulation path too
    fabric = launch(cfg)
    model = fabric.setup_module(build_model(cfg))
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fabric.device))
    batches = iter(torch.randint(0, cfg.model.vocab_size, (4, 2, cfg.seq_len + 1)))
    counts = {"all_reduce": 0, "barrier": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in counts:
        setattr(dist, name, counting(name))
    try:
        result = train_step(fabric, model, optimizer, batches, 2, cfg.optim.grad_clip, False)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert result.skipped is None and result.loss > 0
    Path(f"{out}.{fabric.global_rank}").write_text(json.dumps(counts))


if __name__ == "__main__":
    main(*sys.argv[1:])
