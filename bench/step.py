"""Time the trainer's own training step (model, FSDP2 sharding, optimizer) on synthetic tokens; one JSON line.

    python -m bench.step --config configs/tiny.yaml [--key value ...] --steps 20 [--warmup 5]
    python -m bench.step --config configs/tinyllama-1.1b.yaml --steps 0    # counts only, on the meta device
    python -m bench.step ... --profile true    # then torch.profiler over 3 more steps: operator table on stderr
    python -m bench.step ... --probe true      # then one profiled step: which attention kernels ran
    python -m bench.step ... --heap true       # CPU: also glibc's heap, its peak bytes in use and held

One step is what train.py runs per optimizer step: forward, backward, gradient clipping, AdamW, over
global_batch_size / (micro_batch_size x world) micro-batches. tokens_per_s = tokens per step / median step time.
`planned_peak_mb` (CPU) is training/memory.py's planned peak per rank, beside the measured `peak_rss_mb`;
on CUDA `planned_gpu_mb` (the plan without the context outside torch's allocator) sits beside `peak_gpu_mb`
(torch.cuda.max_memory_allocated). On a CPU, `mfu` is measured against this machine's own matmul peak in the
step's compute dtype (a large torch.matmul timed in the same process); on a GPU, against the device's listed bf16
peak. `graphs` and `graph_breaks` count what torch.compile made of the blocks (0 and 0 in eager mode; 1 and 0 when
every block compiled to one shared graph).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch
from jsonargparse import ArgumentError

from model.attention import attend, resolve_backend
from model.config import flops_per_token
from model.llama import Attention, count_parameters
from training.config import TrainConfig, parse_config
from training.loop import train_step
from training.memory import plan_memory, resident_bytes, runtime_bytes
from training.metrics import device_peak_flops
from training.optim import make_optimizer
from training.setup import build_model, check_init_from, launch


def add_bench_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (0: counts only)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--profile", type=bool, default=False, help="after timing, profile 3 steps; table to stderr")
    parser.add_argument("--probe", type=bool, default=False, help="after timing, profile 1 step: attention kernels")
    parser.add_argument("--heap", type=bool, default=False, help="CPU: sample glibc's heap, in use and held (peaks)")


class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


class HeapSampler:
    """glibc's heap read every few milliseconds on a thread (mallinfo2): the peak of the bytes in use (allocated,
    not yet freed) and the peak of the bytes the heap holds (in use, plus freed memory glibc keeps for reuse,
    training/setup.py: keep_freed_memory). The gap is what the allocator, not the tensors, adds to the RSS."""

    def __init__(self) -> None:
        self.mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self.mallinfo2.restype = MallInfo
        self.in_use = self.held = 0
        info = self.mallinfo2()
        self.start = info.uordblks + info.hblkhd
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            info = self.mallinfo2()
            self.in_use = max(self.in_use, info.uordblks + info.hblkhd)
            self.held = max(self.held, info.arena + info.hblkhd)
            time.sleep(0.002)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {
            "heap_in_use_at_start_mb": round(self.start / 2**20, 1),
            "peak_heap_in_use_mb": round(self.in_use / 2**20, 1),
            "peak_heap_held_mb": round(self.held / 2**20, 1),
        }


def compute_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "32-true" else torch.bfloat16


def matmul_peak_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """This CPU's achievable matmul FLOP/s in `dtype` at the current thread count (median of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


PROFILED_STEPS = 3
PROBED_STEPS = 1

# Profiler event names (ATen operators on any device, then CUDA kernels) that tell which attention ran. ATen's
# own FlashAttention-2 lives in namespace pytorch_flash, the flash-attn package's in flash (or its custom op).
ATTENTION_EVENTS = {
    "SDPA flash": ("_scaled_dot_product_flash_attention", "pytorch_flash::"),
    "SDPA efficient": ("_scaled_dot_product_efficient_attention", "fmha_cutlass"),
    "SDPA cuDNN": ("_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa"),
    "SDPA math": ("_scaled_dot_product_attention_math",),
    "flash-attn": ("flash_attn::", "flash::flash_fwd"),
}


def profiled(step: Callable[[], object], steps: int) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    return prof


def profile_table(prof: torch.profiler.profile) -> str:
    """The operators by their own time."""
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=30)


def attention_kernels(prof: torch.profiler.profile) -> list[str]:
    """The attention implementations whose operators or kernels ran under the profiler."""
    names = {event.key for event in prof.key_averages()}
    return [label for label, marks in ATTENTION_EVENTS.items() if any(m in n for n in names for m in marks)]


def attention_in_use(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> str:
    """The attention the model runs: a device plug-in's own function (cpu_kernels' matmul attention) by its
    module, else the reference backend resolved for this device and dtype."""
    attention = next(m for m in model.modules() if isinstance(m, Attention))
    if attention.attend_fn is not attend:
        return attention.attend_fn.__module__
    return resolve_backend(cfg.model.attention, device, compute_dtype(cfg.precision))


def compile_counts() -> dict:
    """What torch.compile made of the blocks in this process: graphs compiled, graph breaks and the first reason."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    first = next(iter(breaks), None)
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "graph_break_first": first.splitlines()[0] if first else None,
    }


def counts(cfg: TrainConfig) -> dict:
    total, active = count_parameters(cfg.model)
    return {
        "params_total": total,
        "params_active": active,
        "flops_per_token": flops_per_token(cfg.model, cfg.seq_len),
        "model": cfg.model.to_dict(),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.global_batch_size,
        "precision": cfg.precision,
    }


def bench(cfg: TrainConfig, steps: int, warmup: int) -> dict | None:
    """The record of `steps` timed training steps (on rank 0; None on the other ranks)."""
    fabric = launch(cfg)
    unsaved = dataclasses.replace(cfg, async_save=False)  # the benchmark never saves: no background save's copy
    plan = plan_memory(unsaved, fabric.world_size, fabric.device.type, runtime_bytes(fabric.device.type))
    heap = HeapSampler() if cfg.heap and fabric.device.type == "cpu" else None
    model = fabric.setup_module(build_model(cfg))
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fabric.device))
    accum = cfg.grad_accumulation(fabric.world_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = ((warmup + steps + PROFILED_STEPS + PROBED_STEPS) * accum, cfg.micro_batch_size, cfg.seq_len + 1)
    batches = iter(torch.randint(0, cfg.model.vocab_size, shape, generator=generator))
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        return train_step(
            fabric, model, optimizer, batches, accum, cfg.optim.grad_clip, False, cfg.grad_sync_every_micro_batch
        )

    times, losses = [], []
    for i in range(warmup + steps):
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = step()
        elapsed = time.perf_counter() - t0  # train_step ends on a host sync (the reduced loss)
        losses.append(result.loss)
        if i >= warmup:
            times.append(elapsed)

    record = counts(cfg)
    record.update(compile_counts())  # before any profiled step, which could compile more
    # Every rank steps (the collectives need them all); rank 0 prints.
    if cfg.profile:
        table = profile_table(profiled(step, PROFILED_STEPS))
        if fabric.global_rank == 0:
            print(table, file=sys.stderr)
    if cfg.probe:
        record["attention_backend"] = attention_in_use(model, cfg, fabric.device)
        record["attention_kernels"] = attention_kernels(profiled(step, PROBED_STEPS))

    step_s = statistics.median(times)
    tokens_per_s = cfg.global_batch_size * cfg.seq_len / step_s
    achieved = record["flops_per_token"] * tokens_per_s
    if fabric.device.type == "cuda":
        peak = device_peak_flops(fabric.device)
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # what torch's allocator holds at the planned peak: the plan without the context outside it
        record["planned_gpu_mb"] = round((plan.peak_bytes - plan.breakdown["runtime"]) / 2**20, 1)
    else:
        peak = matmul_peak_flops(compute_dtype(cfg.precision))
        record["planned_peak_mb"] = round(plan.peak_bytes / 2**20, 1)
        record["planned_runtime_mb"] = round(plan.breakdown["runtime"] / 2**20, 1)
        if heap:
            record.update(heap.stop())
    record.update(
        tokens_per_s=round(tokens_per_s, 1),
        step_ms=round(step_s * 1e3, 2),
        peak_rss_mb=round(
            (resident_bytes(peak=True) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20, 1
        ),
        achieved_gflops=round(achieved / 1e9, 2),
        peak_gflops=round(peak / 1e9, 1) if peak else None,
        mfu=round(achieved / (peak * fabric.world_size), 4) if peak else None,
        world_size=fabric.world_size,
        threads=torch.get_num_threads(),
        device=str(fabric.device),
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        steps=steps,
        warmup=warmup,
    )
    return record if fabric.global_rank == 0 else None


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv, prog="python -m bench.step", extra_args=add_bench_args)
        check_init_from(cfg)
    except (ArgumentError, ValueError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))
    record = counts(cfg) if cfg.steps == 0 else bench(cfg, cfg.steps, cfg.warmup)
    if record is not None:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
