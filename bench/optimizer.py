"""Time the optimizer step alone, AdamW's and Muon's, and the Newton-Schulz iterations inside Muon's, on a config's
model (built and sharded as train.py builds it) with random gradients; one JSON line.

    python -m bench.optimizer --config configs/tiny.yaml [--key value ...] [--steps 20] [--warmup 5]

bench.step times the whole training step (forward, backward, clipping, optimizer); this isolates the optimizer's
part of it. `newton_schulz_ms` is training/optim.py's newton_schulz over every hidden matrix once, as one Muon step
runs it in one process (`optim.muon_ns_steps` iterations, bf16).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from jsonargparse import ArgumentError

from training.config import TrainConfig, parse_config
from training.optim import is_hidden_matrix, local, make_optimizer, newton_schulz
from training.setup import build_model, launch


def add_bench_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")


def median_ms(fn: Callable[[], object], steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def bench(cfg: TrainConfig, steps: int, warmup: int) -> dict:
    """{adamw_step_ms, muon_step_ms, newton_schulz_ms} with the same random gradients for both optimizers."""
    fabric = launch(cfg)
    model = fabric.setup_module(build_model(cfg))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
        local(p.grad).normal_()  # on the local tensor: DTensor's random ops warn on a CPU mesh
    record = {}
    for name in ("adamw", "muon"):
        optimizer = make_optimizer(model, dataclasses.replace(cfg.optim, name=name), fabric.device)
        record[f"{name}_step_ms"] = median_ms(optimizer.step, steps, warmup)
    grads = [local(p.grad) for n, p in model.named_parameters() if is_hidden_matrix(n)]
    record["newton_schulz_ms"] = median_ms(
        lambda: [newton_schulz(g, cfg.optim.muon_ns_steps) for g in grads], steps, warmup
    )
    record.update(hidden_matrices=len(grads), threads=torch.get_num_threads(), precision=cfg.precision)
    return record


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv, prog="python -m bench.optimizer", extra_args=add_bench_args)
    except (ArgumentError, ValueError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))
    print(json.dumps(bench(cfg, cfg.steps, cfg.warmup)), flush=True)


if __name__ == "__main__":
    main()
