"""One-GPU check of the fast paths: attention backends agree, 1.1B training-step speed, grouped-matmul MoE agrees.

    bash scripts/gpu_check.sh [--out DIR] [--sections attention,moe,training] [--budget SECONDS]
    python -m bench.gpu_check --quick --device cpu      # every section at tiny shapes: a smoke test of this script

Sections (each runs on its own: an error, e.g. out of memory, becomes a row of the table and the rest go on):
  attention  model.attention.attend in bf16 on each backend (flash-attn 2 if installed, SDPA's flash, efficient,
             cuDNN and math kernels, and SDPA's own choice) at TinyLlama's shapes (32 query heads, 4 KV heads, head
             dim 64, seq 2048, causal), forward and backward, against the math kernel in fp32.
  moe        one TinyLlama-1.1B-MoE layer (8 x 2048 tokens, dim 2048, ffn 5632, 8 experts, top-2), forward and
             backward: grouped matmul (torch._grouped_mm) and the looped experts in bf16 against the looped experts
             in fp32; also which path training.setup.grouped_mm_fits picks here.
  training   `python -m bench.step` (the trainer's own step: Fabric, FSDP2, AdamW) for configs/tinyllama-1.1b.yaml
             and configs/tinyllama-1.1b-moe.yaml at micro-batch 8 x 2048 in bf16-mixed, eager then per-block
             compiled; each run is a subprocess with the time left in --budget, so a crash or a slow compile cannot
             take the other rows down. The MoE (6.4B parameters, 103 GB of fp32 weights, gradients and AdamW state)
             runs with full activation checkpointing to fit one 141 GB GPU; MFU counts model FLOPs only. Each row
             also says whether torch.compile made one graph of the blocks (graphs and graph breaks counted by
             dynamo in that run) and which attention ran: the model's backend and the operators or kernels seen
             in one profiled step (SDPA flash / efficient / cuDNN / math, flash-attn), and its peak memory beside
             the memory plan's (training/memory.py) for the same run.

A bf16 result agrees when, for the output and every gradient, its largest absolute error against the fp32 reference
is at most 2^-6 of the reference's largest magnitude (two bf16 rounding steps at that scale); `err/tol` is the worst
such ratio. Writes DIR/gpu_check.md (the printed tables) and DIR/gpu_check.json (every number, error logs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.tables import markdown_table
from model.attention import attend, flash_unavailable_reason
from model.config import ModelConfig
from model.moe import MoEFeedForward
from training.config import model_preset
from training.metrics import device_peak_flops
from training.setup import grouped_mm_fits

REPO = Path(__file__).resolve().parent.parent
BF16_TOLERANCE = 2**-6  # of the reference's largest magnitude
SECTIONS = ("attention", "moe", "training")
START = time.perf_counter()


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int

    def __str__(self) -> str:
        return (
            f"batch {self.batch}, seq {self.seq}, {self.heads} query / {self.kv_heads} KV heads of dim {self.head_dim}"
        )


@dataclass(frozen=True)
class TrainRun:
    name: str
    config: str
    activation_checkpointing: str
    compile: bool

    def flags(self) -> list[str]:
        ac, compiled = self.activation_checkpointing, str(self.compile).lower()
        return [f"--config={self.config}", f"--activation_checkpointing={ac}", f"--compile={compiled}"]


@dataclass(frozen=True)
class Plan:
    attention: AttentionShape
    moe: ModelConfig
    moe_batch: tuple[int, int]  # (micro-batch, seq): the tokens one layer sees
    train_args: tuple[str, ...]  # shared by every training run
    train_runs: tuple[TrainRun, ...]
    reps: int  # timed repetitions of the attention and MoE steps


def _runs(dense: str, moe: str, compiled: bool) -> tuple[TrainRun, ...]:
    """Eager runs first: they are cheap and matter most if the budget runs out during a compile."""
    modes = ("eager", "compiled") if compiled else ("eager",)
    return tuple(
        TrainRun(f"{label}, {mode}", config, ac, mode == "compiled")
        for mode in modes
        for label, config, ac in (("dense", dense, "none"), ("MoE", moe, "full"))
    )


FULL = Plan(
    attention=AttentionShape(batch=2, seq=2048, heads=32, kv_heads=4, head_dim=64),
    moe=model_preset("tinyllama-1.1b-moe"),
    moe_batch=(8, 2048),
    train_args=("--precision=bf16-mixed", "--seq_len=2048", "--micro_batch_size=8", "--global_batch_size=8"),
    train_runs=_runs("configs/tinyllama-1.1b.yaml", "configs/tinyllama-1.1b-moe.yaml", compiled=True),
    reps=5,
)
_TINY_MODEL = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=64)
QUICK = Plan(
    attention=AttentionShape(batch=1, seq=128, heads=8, kv_heads=2, head_dim=32),
    moe=ModelConfig(**_TINY_MODEL, num_experts=8, top_k=2),
    moe_batch=(2, 64),
    train_args=(
        *(f"--model.{k}={v}" for k, v in _TINY_MODEL.items()),
        *("--precision=bf16-mixed", "--seq_len=32", "--micro_batch_size=2", "--global_batch_size=2"),
    ),
    # Inductor takes minutes to compile on a small CPU: --quick leaves the compiled runs out.
    train_runs=_runs("configs/tiny.yaml", "configs/tiny-moe.yaml", compiled=False),
    reps=2,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def error_text(e: BaseException) -> str:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first_line[:200]}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measuring one forward and backward ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dout: torch.Tensor
) -> list[torch.Tensor]:
    """The output and the gradients of `leaves` for the upstream gradient `dout`."""
    for t in leaves:
        t.grad = None
    out = forward()
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


def measure(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dout: torch.Tensor, reps: int
) -> tuple[list[torch.Tensor], float]:
    """Output and gradients of a first (warm-up) run, and the median milliseconds of `reps` more runs."""
    device = dout.device
    results = forward_backward(forward, leaves, dout)
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        forward_backward(forward, leaves, dout)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return results, statistics.median(times) * 1e3


def agreement(results: list[torch.Tensor], reference: list[torch.Tensor], names: list[str]) -> dict:
    """Largest error of the output and of each gradient against the fp32 reference, and whether all are within
    the bf16 tolerance of their scale."""
    errors = {name: (r.float() - ref).abs().max().item() for name, r, ref in zip(names, results, reference)}
    ratios = [errors[name] / (BF16_TOLERANCE * ref.abs().max().item()) for name, ref in zip(names, reference)]
    worst = max(ratios)
    return {
        "out_err": errors[names[0]],
        "grad_err": max(errors[n] for n in names[1:]),
        "err/tol": worst,
        "status": "ok" if worst <= 1 else "FAIL: outside bf16 tolerance",
        "errors": errors,
    }


# --- attention -----------------------------------------------------------------------------------------------------

ATTENTION_NAMES = ["out", "dq", "dk", "dv"]
CUDA_ONLY = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)
# (row, backend name for attend(), SDPA kernel it is restricted to, or None for SDPA's own choice)
ATTENTION_BACKENDS = (
    ("flash-attn 2", "flash", None),
    ("sdpa: flash kernel", "sdpa", SDPBackend.FLASH_ATTENTION),
    ("sdpa: efficient kernel", "sdpa", SDPBackend.EFFICIENT_ATTENTION),
    ("sdpa: cuDNN kernel", "sdpa", SDPBackend.CUDNN_ATTENTION),
    ("sdpa: math kernel", "sdpa", SDPBackend.MATH),
    ("sdpa: its own choice", "sdpa", None),
)


def attention_inputs(shape: AttentionShape, device: torch.device) -> list[torch.Tensor]:
    """q, k, v in [B, T, heads, head_dim] and an upstream gradient for the output, in fp32."""
    g = torch.Generator(device).manual_seed(0)
    b, t, d = shape.batch, shape.seq, shape.head_dim
    sizes = [(b, t, shape.heads, d), (b, t, shape.kv_heads, d), (b, t, shape.kv_heads, d), (b, t, shape.heads, d)]
    return [torch.randn(s, generator=g, device=device) for s in sizes]


def attention_step(inputs: list[torch.Tensor], dtype: torch.dtype, backend: str):
    """(forward, leaves, upstream gradient) of attend() on copies of the inputs in `dtype`."""
    q, k, v, dout = (x.to(dtype, copy=True) for x in inputs)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    return (lambda: attend(*leaves, backend)), leaves, dout


def only_kernel(kernel: SDPBackend | None):
    return sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()


def attention_skip_reason(backend: str, kernel, device: torch.device) -> str | None:
    if backend == "flash":
        return flash_unavailable_reason(device, torch.bfloat16)
    if kernel in CUDA_ONLY and device.type != "cuda":
        return "CUDA only"
    return None


def check_attention(plan: Plan, device: torch.device) -> list[dict]:
    shape = plan.attention
    inputs = attention_inputs(shape, device)
    with only_kernel(SDPBackend.MATH):
        reference = forward_backward(*attention_step(inputs, torch.float32, "sdpa"))
    log(f"attention: fp32 math reference at {shape}")
    rows = []
    for name, backend, kernel in ATTENTION_BACKENDS:
        row = {"backend": name}
        reason = attention_skip_reason(backend, kernel, device)
        if reason:
            rows.append({**row, "status": f"skipped: {reason}"})
            continue
        try:
            with only_kernel(kernel):
                results, ms = measure(*attention_step(inputs, torch.bfloat16, backend), plan.reps)
            rows.append({**row, "fwd+bwd ms": ms, **agreement(results, reference, ATTENTION_NAMES)})
        except Exception as e:  # a backend that cannot run these inputs is a finding, not a crash
            rows.append({**row, "status": error_text(e)})
        log(f"attention: {name}: {rows[-1]['status']}")
        free_memory()
    return rows


# --- MoE -----------------------------------------------------------------------------------------------------------

MOE_NAMES = ["out", "dx", "router", "gate_proj", "up_proj", "down_proj"]


def moe_layer(cfg: ModelConfig, device: torch.device) -> MoEFeedForward:
    torch.manual_seed(0)
    with torch.device(device):
        layer = MoEFeedForward(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer


def moe_step(layer: MoEFeedForward, inputs: list[torch.Tensor], dtype: torch.dtype, grouped: bool):
    """(forward, leaves, upstream gradient) of a copy of the layer in `dtype` on the expert path `grouped`."""
    layer = copy.deepcopy(layer).to(dtype)
    layer.grouped_mm = grouped
    x, dout = (t.to(dtype, copy=True) for t in inputs)
    leaves = [x.requires_grad_(), layer.router.weight, layer.gate_proj, layer.up_proj, layer.down_proj]
    return (lambda: layer(x)[0]), leaves, dout


def check_moe(plan: Plan, device: torch.device) -> list[dict]:
    cfg, (batch, seq) = plan.moe, plan.moe_batch
    layer = moe_layer(cfg, device)
    g = torch.Generator(device).manual_seed(0)
    # Round the input to bf16 first, so the fp32 reference routes exactly the same tokens to the same experts.
    inputs = [torch.randn(batch, seq, cfg.dim, generator=g, device=device).bfloat16().float() for _ in range(2)]
    reference = forward_backward(*moe_step(layer, inputs, torch.float32, grouped=False))
    log(
        f"moe: fp32 looped reference, {batch}x{seq} tokens, dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_experts} experts"
    )
    default_grouped = grouped_mm_fits(device, torch.bfloat16)
    rows = []
    for grouped in (False, True):
        row = {
            "experts": "grouped (torch._grouped_mm)" if grouped else "looped",
            "default here": grouped == default_grouped,
        }
        try:
            results, ms = measure(*moe_step(layer, inputs, torch.bfloat16, grouped), plan.reps)
            rows.append({**row, "fwd+bwd ms": ms, **agreement(results, reference, MOE_NAMES)})
        except Exception as e:
            rows.append({**row, "status": error_text(e)})
        log(f"moe: {row['experts']}: {rows[-1]['status']}")
        free_memory()
    looped, grouped_row = rows
    if "fwd+bwd ms" in looped and "fwd+bwd ms" in grouped_row:
        grouped_row["speed-up"] = looped["fwd+bwd ms"] / grouped_row["fwd+bwd ms"]
    return rows


# --- training ------------------------------------------------------------------------------------------------------


def run_subprocess(args: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr); on timeout the whole process group (compile workers too)
    is killed."""
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def last_error_line(stderr: str) -> str:
    """The line that names the exception, e.g. 'torch.OutOfMemoryError: CUDA out of memory. ...'."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    return (named or lines or ["no output"])[-1][:200]


def block_graphs(record: dict) -> str:
    """Whether torch.compile turned each block into one graph (all blocks share it), else what it made."""
    graphs, breaks = record["graphs"], record["graph_breaks"]
    if graphs == 0:
        return "eager"
    if graphs == 1 and breaks == 0:
        return "one graph"
    first = f": {record['graph_break_first']}" if breaks else ""
    return f"{graphs} graphs, {breaks} breaks{first}"


def attention_ran(record: dict) -> str:
    """The model's attention backend here and the attention operators or kernels the profiler saw run."""
    kernels = ", ".join(record["attention_kernels"]) or "no SDPA or flash-attn operator"
    return f"{record['attention_backend']}: {kernels}"


def train_row(record: dict) -> dict:
    peak_mb = record.get("peak_gpu_mb", record.get("peak_rss_mb"))
    planned_mb = record.get("planned_gpu_mb", record.get("planned_peak_mb"))
    return {
        "layers": record["model"]["n_layers"],
        "params": f"{record['params_total'] / 1e6:,.1f}M",
        "tokens/s": record["tokens_per_s"],
        "MFU": record["mfu"],
        "peak GiB": peak_mb / 1024,
        "planned GiB": planned_mb / 1024,
        "step ms": record["step_ms"],
        "loss": f"{record['loss_first']:.3f} -> {record['loss_last']:.3f}",
        "block graphs": block_graphs(record),
        "attention": attention_ran(record),
        "status": "ok",
        "record": record,
    }


def check_training(plan: Plan, device: torch.device, deadline: float, steps: int, warmup: int) -> list[dict]:
    rows = []
    for run in plan.train_runs:
        row = {"run": run.name, "config": run.config, "AC": run.activation_checkpointing, "compile": run.compile}
        left = deadline - time.perf_counter()
        if left < 30:
            rows.append({**row, "status": f"skipped: time budget spent ({left:.0f} s left)"})
            continue
        args = [sys.executable, "-m", "bench.step", *run.flags(), *plan.train_args]
        args += [f"--accelerator={device.type}", f"--steps={steps}", f"--warmup={warmup}", "--probe=true"]
        log(f"training: {run.name} (up to {left:.0f} s): {' '.join(args[1:])}")
        code, out, err = run_subprocess(args, timeout=left)
        record = last_json(out) if code == 0 else None
        if record is not None:
            rows.append({**row, **train_row(record)})
        else:
            status = f"error: timed out after {left:.0f} s" if code is None else f"error: {last_error_line(err)}"
            rows.append({**row, "status": status, "log_tail": err[-3000:]})
        log(f"training: {run.name}: {rows[-1]['status']}")
    return rows


# --- report --------------------------------------------------------------------------------------------------------

COLUMNS = {
    "attention": ["backend", "fwd+bwd ms", "out_err", "grad_err", "err/tol", "status"],
    "moe": ["experts", "default here", "fwd+bwd ms", "speed-up", "out_err", "grad_err", "err/tol", "status"],
    "training": [
        "run",
        "layers",
        "params",
        "AC",
        "compile",
        "tokens/s",
        "MFU",
        "peak GiB",
        "planned GiB",
        "step ms",
        "loss",
        "block graphs",
        "attention",
        "status",
    ],
}


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            bf16_peak_tflops=(device_peak_flops(device) or 0) / 1e12 or None,
        )
    return env


def markdown(env: dict, results: dict[str, list[dict]], plan: Plan) -> str:
    lines = ["# GPU check", "", " | ".join(f"{k}: {v}" for k, v in env.items()), ""]
    notes = {
        "attention": f"{plan.attention}, causal; bf16 against the fp32 math kernel",
        "moe": f"one MoE layer, {plan.moe_batch[0]}x{plan.moe_batch[1]} tokens, bf16 vs fp32 looped experts",
        "training": "python -m bench.step " + " ".join(plan.train_args) + " (AC: activation checkpointing; peak: "
        "torch.cuda.max_memory_allocated, planned: training/memory.py's plan of the run without the CUDA context)",
    }
    for section, rows in results.items():
        lines += [f"## {section}: {notes[section]}", "", markdown_table(rows, COLUMNS[section]), ""]
    return "\n".join(lines)


def run_section(section: str, plan: Plan, device: torch.device, args: argparse.Namespace, deadline: float):
    """The section's rows; an exception outside any row becomes the section's only row."""
    log(f"{section}: start")
    try:
        if section == "attention":
            return check_attention(plan, device)
        if section == "moe":
            return check_moe(plan, device)
        return check_training(plan, device, deadline, args.steps, args.warmup)
    except Exception as e:
        log(f"{section}: {error_text(e)}")
        return [{COLUMNS[section][0]: "(section)", "status": error_text(e)}]
    finally:
        free_memory()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and no compiled runs (for a CPU smoke test)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default="runs/gpu_check", help="directory for gpu_check.md and gpu_check.json")
    p.add_argument(
        "--budget", type=float, default=450, help="seconds for the whole check; training runs get what is left"
    )
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per training run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (the compile happens here)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; `--device cpu --quick` runs the smoke test")
    deadline = START + args.budget
    plan = QUICK if args.quick else FULL
    env = environment(device)
    log(f"environment: {env}")
    results = {section: run_section(section, plan, device, args, deadline) for section in args.sections}
    report = markdown(env, results, plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(report)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "sections": results}, indent=1, default=str))
    print(report, flush=True)
    log(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
