"""Will it fit? The per-rank memory plan of a training configuration, before anything is launched or allocated.

    python -m tools.plan --config configs/tinyllama-1.1b.yaml [--key value ...] [--devices N] [--num_nodes M]
        [--accelerator cuda] [--device-memory GB] [--json]

Prints the planned peak per rank, what it is made of and when it happens (training/memory.py); with
--device-memory, the largest micro-batch that fits in that many GB (10^9 bytes) per rank, with and without
activation checkpointing. --json prints one line: {"peak_bytes", "peak_at", "breakdown", "max_micro_batch", ...}.
The target device is `--accelerator` (auto: this machine's): on a CPU the runtime is this process's resident memory
(the same libraries a rank imports), on CUDA an estimate of the context.
"""

from __future__ import annotations

import json
import sys

from jsonargparse import ArgumentError

from training.config import TrainConfig, parse_config
from training.memory import GiB, fitting_micro_batches, plan_memory, runtime_bytes
from training.setup import resolve_accelerator


def add_plan_args(parser) -> None:
    parser.add_argument("--device-memory", type=float, help="GB (10^9 bytes) of memory per rank")
    parser.add_argument("--json", type=bool, default=False, help="print one JSON line")


def plan_record(cfg: TrainConfig, device_memory_gb: float | None) -> dict:
    world = cfg.devices * cfg.num_nodes
    cfg.grad_accumulation(world)  # a batch that cannot be split over the ranks is an error here
    device = resolve_accelerator(cfg)
    runtime = runtime_bytes(device)
    plan = plan_memory(cfg, world, device, runtime)
    record = {"device": device, "world_size": world, **plan.to_dict(), "max_micro_batch": None}
    if device_memory_gb is not None:
        if not device_memory_gb > 0:
            raise ValueError(f"--device-memory must be a positive number of GB, got {device_memory_gb}")
        available = int(device_memory_gb * 1e9) - runtime
        record["max_micro_batch"] = fitting_micro_batches(cfg, world, device, runtime, available)
    return record


def report(cfg: TrainConfig, record: dict) -> str:
    lines = [
        f"{cfg.config_name}: {record['world_size']} rank(s) on {record['device']}, micro-batch {cfg.micro_batch_size} "
        f"x {cfg.seq_len}, {cfg.precision}, activation checkpointing {cfg.activation_checkpointing}, "
        f"optimizer {cfg.optim.name}",
        f"planned peak per rank: {record['peak_bytes'] / GiB:.2f} GiB, at {record['peak_at']}",
    ]
    lines += [f"  {name:<18} {value / GiB:8.2f} GiB" for name, value in record["breakdown"].items()]
    if record["max_micro_batch"] is not None:
        for ac, micro in record["max_micro_batch"].items():
            lines.append(f"largest micro-batch that fits, activation checkpointing {ac}: {micro or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv, prog="python -m tools.plan", extra_args=add_plan_args)
        record = plan_record(cfg, cfg.device_memory)
    except (ArgumentError, ValueError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))
    print(json.dumps(record) if cfg.json else report(cfg, record))


if __name__ == "__main__":
    main()
