"""The memory plan (training/memory.py) against measurement: each row runs `python -m bench.step` for a few steps
and prints rank 0's planned peak beside its measured peak resident memory (CPU) or peak allocated memory (CUDA).
On a CPU it also sets the plan's tensors (the peak without the runtime) beside the growth of glibc's heap from the
model's build on: the peak bytes in use, and the peak bytes the heap holds, in use or freed and kept.

    python -m bench.memory [--shapes tiny small 125m 1.1b] [--devices 1 2] [--ac none full] [--steps 2]

One row per shape, process count and activation checkpointing; a markdown table on stdout (docs/performance.md
holds the one measured on the development machine). The 1.1B rows need about 20 GB of RAM with 1 process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.tables import markdown_table
from bench.vs_peer import SHAPES as PEER_SHAPES

MODEL_125M = "--model.n_layers=12 --model.dim=768 --model.n_heads=12 --model.n_kv_heads=4 --model.ffn_dim=2048"
SMALL = "--model.n_layers={} --model.dim={} --model.n_heads={} --model.n_kv_heads={} --model.ffn_dim={}".format(
    *PEER_SHAPES["small"][:5]  # bench.vs_peer's small shapes
)
# shape: (flags, micro-batch per rank); the global batch is one micro-batch per rank, except tiny's own 16
SHAPES = {
    "tiny": ("--config=configs/tiny.yaml", 8),
    "small": (f"--config=configs/tiny.yaml {SMALL} --model.vocab_size=32000 --model.max_seq_len=512 --seq_len=512", 4),
    "125m": (
        f"--config=configs/tiny.yaml {MODEL_125M} --model.vocab_size=32000 --model.max_seq_len=512 --seq_len=512 "
        "--precision=bf16-mixed",
        8,
    ),
    "1.1b": ("--config=configs/tinyllama-1.1b.yaml --seq_len=512 --precision=bf16-mixed", 1),
}


def step_args(shape: str, devices: int, ac: str, steps: int) -> list[str]:
    flags, micro = SHAPES[shape]
    batch = [] if shape == "tiny" else [f"--global_batch_size={micro * devices}"]
    return [
        "-m", "bench.step", *flags.split(), f"--micro_batch_size={micro}", *batch, f"--devices={devices}",
        f"--threads={2 // devices or 1}", f"--activation_checkpointing={ac}", f"--steps={steps}", "--warmup=1",
        "--optim.name=adamw", "--heap=true",
    ]  # fmt: skip


def measure(shape: str, devices: int, ac: str, steps: int) -> dict:
    args = step_args(shape, devices, ac, steps)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: python {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = record.get("peak_gpu_mb", record["peak_rss_mb"])  # bench.step reports the RSS on CUDA too
    planned = record.get("planned_peak_mb", record.get("planned_gpu_mb"))
    row = {
        "shape": shape,
        "processes": devices,
        "activation checkpointing": ac,
        "micro-batch": f"{SHAPES[shape][1]} x {record['seq_len']}",
        "precision": record["precision"],
        "planned MB": round(planned),
        "measured MB": round(measured),
        "planned / measured": f"{planned / measured:.3f}",
    }
    if "peak_heap_in_use_mb" in record:
        start = record["heap_in_use_at_start_mb"]
        row["planned tensors MB"] = round(planned - record["planned_runtime_mb"])
        row["heap in use MB"] = round(record["peak_heap_in_use_mb"] - start)
        row["heap held MB"] = round(record["peak_heap_held_mb"] - start)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    p.add_argument("--ac", nargs="+", choices=["none", "full"], default=["none", "full"])
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes:
        for devices in args.devices:
            for ac in args.ac:
                rows.append(measure(shape, devices, ac, args.steps))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
