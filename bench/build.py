"""Peak memory and time of building the model, per rank: construction, sharding and initialisation (what train.py
does before its first step, `init_from` included); one JSON line per rank.

    python -m bench.build --config configs/tinyllama-1.1b.yaml [--key value ...] [--devices 2]

`peak_increase_mb`: how far the process's peak resident memory (VmHWM, reset just before the build) rose above its
resident memory before the build. `shard_mb`: the parameters this rank holds when built; `largest_param_mb`: the
largest whole parameter; `model_mb`: all parameters. Linux only (it reads /proc/self).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from jsonargparse import ArgumentError
from torch.distributed.tensor import DTensor

from training.config import parse_config
from training.setup import build_model, check_init_from, launch

MB = 2**20


def memory_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak_memory() -> None:
    """Set VmHWM back to the current resident memory (Linux's clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def parameter_bytes(model: torch.nn.Module) -> dict:
    params = list(model.parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    return {
        "shard_mb": round(sum(t.numel() * t.element_size() for t in local) / MB, 1),
        "largest_param_mb": round(max(p.numel() * p.element_size() for p in params) / MB, 1),
        "model_mb": round(sum(p.numel() * p.element_size() for p in params) / MB, 1),
    }


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv, prog="python -m bench.build")
        check_init_from(cfg)
    except (ArgumentError, ValueError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))
    fabric = launch(cfg)
    fabric.barrier()
    before_kb = memory_kb("VmRSS")
    reset_peak_memory()
    started = time.perf_counter()
    model = fabric.setup_module(build_model(cfg))
    seconds = time.perf_counter() - started
    record = {
        "rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "build_s": round(seconds, 2),
        "rss_before_mb": round(before_kb / 1024, 1),
        "peak_increase_mb": round((memory_kb("VmHWM") - before_kb) / 1024, 1),
        **parameter_bytes(model),
    }
    print(json.dumps(record), flush=True)
    fabric.barrier()


if __name__ == "__main__":
    main()
