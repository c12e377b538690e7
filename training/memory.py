"""A per-rank memory plan of a training run, by arithmetic on the model's shapes (built on the meta device): what
the parameters, gradients, optimizer state, FSDP2's unsharded working set, the saved activations and the loss take,
and the peak of the training step they add up to.

The step's memory peaks at one of three moments, each a sum of what is alive then:
- the start of backward: parameters, optimizer state, every activation saved for backward, the loss's saved
  gradients and its chunk buffers, the units FSDP2 holds gathered, the gradient accumulators;
- the end of backward: parameters, optimizer state and every sharded gradient, with the last units' unsharded
  gradients and reduce-scatter buffers;
- the optimizer step: parameters, gradients, optimizer state and the optimizer's temporaries (Muon's).
Gradients are freed after each step (zero_grad(set_to_none=True)), so they and the activations never peak together.
On a CPU a background checkpoint save (`async_save`) holds a copy of the parameters and optimizer state meanwhile
(on a GPU that copy is in host memory).

What each operation saves for backward is counted from the code it runs (model/, cpu_kernels/) and torch's kernels:
tests/test_memory.py checks the CPU counts against what autograd really saves, and the plan against a measured run;
docs/performance.md holds the table of planned against measured peaks. On CUDA the counts follow torch's source
(fused RMSNorm, SDPA's flash kernel); bench/gpu_check.py prints the plan beside torch.cuda.max_memory_allocated.

The plan counts bytes in use. An allocator holds more: on a CPU glibc keeps freed heap memory for reuse
(training/setup.py: keep_freed_memory), which measured 9-20% above the plan's peak with one process and up to 68%
at mid sizes with two; the plan leaves that out rather than guess it (docs/performance.md: what the allocator adds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch

from cpu_kernels.attention import MATMUL_MAX_SEQ, QUERY_BLOCK
from cpu_kernels.loss import chunk_rows as cpu_chunk_rows
from cpu_kernels.moe import BF16_ROW_ALIGN
from model.config import ModelConfig
from model.llama import Transformer
from model.loss import chunk_rows
from model.moe import GROUPED_MM_ALIGN
from training.config import TrainConfig
from training.optim import is_hidden_matrix
from training.parallelize import GROUPS_ALLOW_UNCALLED_MODULES
from training.setup import TrainingError

GiB = 2**30
FP32 = 4
INDEX = 8  # int64 indices
# The CUDA context, cuBLAS/cuDNN handles and kernels: device memory outside torch's allocator (an estimate, to be
# checked against nvidia-smi by the first GPU run; torch.cuda.max_memory_allocated does not include it).
CUDA_RUNTIME_BYTES = 3 * GiB // 4


@dataclass
class MemoryPlan:
    """Bytes per rank. `breakdown` adds up to `peak_bytes` at the moment `peak_at` names."""

    peak_bytes: int
    peak_at: str
    breakdown: dict[str, int]

    def summary(self) -> str:
        parts = ", ".join(f"{name} {gib(b)}" for name, b in self.breakdown.items() if b)
        return f"planned peak {gib(self.peak_bytes)} GiB per rank at {self.peak_at} ({parts})"

    def to_dict(self) -> dict:
        return asdict(self)


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


@dataclass(frozen=True)
class Precision:
    """Bytes per element: parameters (and their gradients and optimizer state), the compute dtype, the dtype
    gradients are reduce-scattered in."""

    param: int
    compute: int
    reduce: int

    @classmethod
    def of(cls, precision: str, shards: int) -> Precision:
        if precision == "32-true":
            return cls(FP32, FP32, FP32)
        if precision == "bf16-mixed":
            return cls(FP32, 2, FP32)
        return cls(2, 2, FP32 if shards > 1 else 2)  # bf16-true: fp32 reduction across ranks only


@dataclass(frozen=True)
class Unit:
    """An FSDP2 unit: its parameters' element counts whole (padded to a multiple of the shard count on the sharded
    dim, as FSDP2 pads them) and per rank."""

    whole: int
    local: int
    gathered_through_backward: bool  # kept unsharded from its forward to its backward


def local_numel(shape: torch.Size, shards: int, dim: int) -> int:
    """Elements of one rank's shard: FSDP2 splits dim `dim` in chunks of ceil(size / shards) rows."""
    rows = -(-shape[dim] // shards)
    return rows * math.prod(shape) // shape[dim] if shape[dim] else 0


def units(model: Transformer, shards: int) -> list[Unit]:
    """The FSDP2 units of training/parallelize.py: each block, the embedding and [norm, head] (untied, where torch
    allows the head's unit), the root (what is left). Stacked experts go on dim 1 above num_experts shards."""
    cfg = model.cfg
    expert_dim = 1 if cfg.is_moe and shards > cfg.num_experts else 0

    def unit(modules: list[torch.nn.Module], kept: bool) -> Unit:
        params = [p for m in modules for p in m.parameters()]
        dims = [expert_dim if p.ndim == 3 else 0 for p in params]
        local = sum(local_numel(p.shape, shards, d) for p, d in zip(params, dims))
        return Unit(local * shards, local, kept)

    head_unit = not cfg.tie_embeddings and GROUPS_ALLOW_UNCALLED_MODULES
    blocks = [unit([block], kept=i == cfg.n_layers - 1 and not head_unit) for i, block in enumerate(model.layers)]
    if not head_unit:
        rest = [model.norm, model.lm_head] + ([] if cfg.tie_embeddings else [model.tok_embeddings])
        return [*blocks, unit(rest, kept=True)]
    return [*blocks, unit([model.tok_embeddings], kept=False), unit([model.norm, model.lm_head], kept=True)]


@dataclass(frozen=True)
class Kernels:
    """Which code computes the parts whose saved tensors differ: the CPU plug-in (cpu_kernels/) or the reference,
    and on which device type."""

    device: str  # "cpu" or "cuda"
    cpu_plugin: bool
    attention: str  # "sdpa" or "flash" (flash-attn)

    @classmethod
    def of(cls, cfg: TrainConfig, device: str) -> Kernels:
        flash = cfg.model.attention == "flash" or (cfg.model.attention == "auto" and device == "cuda" and flash_found())
        return cls(device, device == "cpu" and cfg.cpu_kernels, "flash" if flash else "sdpa")


def flash_found() -> bool:
    from importlib.util import find_spec

    return find_spec("flash_attn") is not None


def norm_saved(n: int, d: int, c: int, kernels: Kernels) -> int:
    """One RMSNorm: torch's composite on a CPU saves its input upcast to fp32 and the fp32 normalised input; the fused
    CUDA kernel and the CPU plug-in save the input and the row scales."""
    if kernels.device == "cpu" and not kernels.cpu_plugin:
        return 2 * n * d * FP32 + n * FP32
    return n * d * c + n * FP32


def matmul_attention_probs(batch: int, seq: int, heads: int) -> int:
    """Elements of the CPU plug-in's saved softmax: each block of query positions against the keys up to its end."""
    return (
        batch * heads * sum(min(QUERY_BLOCK, seq - s) * min(s + QUERY_BLOCK, seq) for s in range(0, seq, QUERY_BLOCK))
    )


def attention_saved(batch: int, seq: int, m: ModelConfig, c: int, kernels: Kernels) -> int:
    """Attention after its norm: the projections' input, then what the attention kernel keeps (queries, keys,
    values, output and its log-sum-exp for flash-style kernels; the CPU plug-in keeps its softmax instead of the
    log-sum-exp, and a copy of the output for o_proj). CUDA's math kernel (fp32 with grouped queries) repeats K/V
    and keeps the [T, T] probabilities."""
    n, d, dkv = batch * seq, m.dim, m.n_kv_heads * m.head_dim
    saved = n * d * c  # the normalised input of q/k/v
    qkvo = (2 * n * d + 2 * n * dkv) * c
    if kernels.cpu_plugin and c == 2 and seq <= MATMUL_MAX_SEQ:
        return saved + qkvo + matmul_attention_probs(batch, seq, m.n_heads) * c
    if kernels.device == "cuda" and c == FP32 and kernels.attention == "sdpa":
        return saved + (4 * n * d) * c + batch * m.n_heads * seq * seq * c
    return saved + qkvo + n * m.n_heads * FP32


def moe_rows(n: int, m: ModelConfig, kernels: Kernels, c: int) -> int:
    """Expert-sorted rows of one MoE layer: every token k times, and each expert's rows padded to the kernel's
    alignment (the plug-in's bf16 padding, the grouped matmul's): (align - 1) / 2 rows per expert on average."""
    if kernels.cpu_plugin:
        align = BF16_ROW_ALIGN if c == 2 else 1
    else:
        align = GROUPED_MM_ALIGN if c == 2 and kernels.device in ("cpu", "cuda") else 1
    return n * m.top_k + m.num_experts * (align - 1) // 2


def ffn_saved(n: int, m: ModelConfig, c: int, kernels: Kernels) -> int:
    """The FFN after its norm: SwiGLU keeps its input, the gate and up projections, the activation and the product;
    a MoE layer also keeps the router's fp32 input and outputs, the expert-sorted copy of its input, its experts'
    four [rows, ffn] tensors and the k gathered outputs per token."""
    d, f = m.dim, m.ffn_dim
    if not m.is_moe:
        return n * d * c + 4 * n * f * c
    rows = moe_rows(n, m, kernels, c)
    router = n * d * (FP32 if c != FP32 else 0) + 3 * n * m.num_experts * FP32 + 4 * n * m.top_k * INDEX
    return n * d * c + router + rows * (d + 4 * f) * c + n * m.top_k * d * c + rows * INDEX


def block_saved(batch: int, seq: int, m: ModelConfig, c: int, kernels: Kernels) -> int:
    """What one decoder block saves for backward (without activation checkpointing)."""
    n = batch * seq
    norms = 2 * norm_saved(n, m.dim, c, kernels)
    return norms + attention_saved(batch, seq, m, c, kernels) + ffn_saved(n, m, c, kernels)


def loss_buffers(n: int, m: ModelConfig, c: int, kernels: Kernels) -> tuple[int, int]:
    """(saved, working) bytes of the fused head + loss, which computes its gradients in forward: the saved
    gradients for the hidden states and the head weight, and one chunk's buffers at their fullest. The reference
    takes each chunk's softmax in fp32 and adds the head gradient up in fp32; the CPU plug-in keeps the logits'
    dtype, in place."""
    v, d = m.vocab_size, m.dim
    saved = n * d * c + v * d * c  # the head weight's gradient in its unsharded (compute) dtype
    if kernels.cpu_plugin:
        rows = min(n, cpu_chunk_rows(v))
        return saved, rows * v * c + rows * d * c
    rows = min(n, chunk_rows(v))
    upcast = FP32 if c != FP32 else 0  # an fp32 copy next to the compute-dtype tensor
    chunk = rows * v * (c + FP32 + upcast)  # logits, their fp32 copy or log-sum-exp's temporary, the gradient
    head_grad = v * d * (FP32 + c + upcast)  # the fp32 accumulator, one chunk's product and its fp32 copy
    return saved, chunk + head_grad


def embedding_saved(n: int) -> int:
    return n * INDEX


def fsdp_working(all_units: list[Unit], p: Precision, unsharded_dtype_bytes: int) -> tuple[int, int, int]:
    """(kept, forward, backward) bytes of FSDP2's unsharded working set: the units kept gathered from forward to
    backward; one unit being gathered (its copy-in buffer and all-gather output) in forward; in backward the current
    and the prefetched unit's parameters, the current one's unsharded gradients and its reduce-scatter input and
    output."""
    kept = sum(u.whole for u in all_units if u.gathered_through_backward) * unsharded_dtype_bytes
    largest = max(all_units, key=lambda u: u.whole)
    forward = (largest.whole + largest.local) * unsharded_dtype_bytes
    grads = largest.whole * p.compute + largest.whole * p.reduce + largest.local * p.reduce
    backward = 2 * largest.whole * unsharded_dtype_bytes + grads
    return kept, forward, backward


def muon_step_bytes(model: Transformer, shards: int, p: Precision, nesterov: bool) -> int:
    """Muon's temporaries in the optimizer step (training/optim.py): the Nesterov updates of this rank's matrix
    shards, their bf16 copies on the way to and from the owners (all-to-all), the owners' orthogonalised whole
    matrices, and Newton-Schulz's buffers for the largest matrix."""
    matrices = [q for name, q in model.named_parameters() if is_hidden_matrix(name)]
    local = sum(local_numel(q.shape, shards, 0) for q in matrices)
    largest = max(q.numel() for q in matrices)
    copies = 1 if shards == 1 else 4
    return local * p.param * nesterov + local * 2 * copies + 5 * largest * 2


def plan_memory(cfg: TrainConfig, world_size: int, device: str, runtime_bytes: int) -> MemoryPlan:
    """The per-rank plan of training `cfg` with `world_size` ranks on `device` ("cpu" or "cuda"), whose runtime
    (libraries, CUDA context) takes `runtime_bytes` before the model exists. Allocates nothing."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    m, shards = cfg.model, world_size // cfg.fsdp_replicas
    p = Precision.of(cfg.precision, shards)
    kernels = Kernels.of(cfg, device)
    all_units = units(model, shards)
    local = sum(u.local for u in all_units)

    params = grads = local * p.param
    optimizer = 2 * local * p.param
    step_temporaries = 0
    if cfg.optim.name == "muon":
        matrix_share = muon_matrix_fraction(model)
        optimizer = round(local * p.param * (2 - matrix_share))  # one momentum per matrix, two moments elsewhere
        step_temporaries = muon_step_bytes(model, shards, p, cfg.optim.muon_nesterov)
    accum = cfg.grad_accumulation(world_size)
    accumulators = local * shards * FP32 if accum > 1 and not cfg.grad_sync_every_micro_batch else 0

    batch, seq, c = cfg.micro_batch_size, cfg.seq_len, p.compute
    n = batch * seq
    block = block_saved(batch, seq, m, c, kernels)
    if cfg.activation_checkpointing == "full":  # each block keeps its input; backward recomputes one block
        saved = m.n_layers * n * m.dim * c + block
    else:
        saved = m.n_layers * block
    saved += norm_saved(n, m.dim, c, kernels) + embedding_saved(n)
    loss_saved, loss_working = loss_buffers(n, m, c, kernels)
    kept, fsdp_forward, fsdp_backward = fsdp_working(all_units, p, c)

    moments = {
        "the start of backward": {
            "activations": saved,
            "loss": loss_saved + loss_working,
            "fsdp_buffers": kept + fsdp_forward,
            "grad_accumulation": accumulators,
        },
        "the end of backward": {"gradients": grads, "fsdp_buffers": fsdp_backward, "grad_accumulation": accumulators},
        "the optimizer step": {"gradients": grads, "optimizer_step": step_temporaries},
    }
    base = {"runtime": runtime_bytes, "parameters": params, "optimizer": optimizer}
    if cfg.async_save and device == "cpu":  # a background save keeps a copy of the state while training goes on
        base["checkpoint_staging"] = params + optimizer
    peak_at, extra = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    breakdown = {**base, **extra}
    return MemoryPlan(sum(breakdown.values()), peak_at, breakdown)


def max_micro_batch(cfg: TrainConfig, world_size: int, device: str, runtime_bytes: int, available: int) -> int | None:
    """The largest micro-batch (a divisor of the per-rank batch) whose planned peak fits in `available` bytes per
    rank beyond the runtime, or None when not even 1 does."""
    per_rank = cfg.global_batch_size // world_size
    for micro in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
        trial = dataclasses.replace(cfg, micro_batch_size=micro)
        if plan_memory(trial, world_size, device, runtime_bytes).peak_bytes - runtime_bytes <= available:
            return micro
    return None


def fitting_micro_batches(
    cfg: TrainConfig, world_size: int, device: str, runtime_bytes: int, available: int
) -> dict[str, int | None]:
    """max_micro_batch without activation checkpointing and with it: {"none": ..., "full": ...}."""
    return {
        ac: max_micro_batch(dataclasses.replace(cfg, activation_checkpointing=ac), world_size, device, runtime_bytes,
                            available)
        for ac in ("none", "full")
    }  # fmt: skip


def resident_bytes(peak: bool = False) -> int:
    """This process's resident memory now, or its peak (Linux's /proc: VmRSS, VmHWM; 0 where there is none).

    The peak is this program's own: getrusage's ru_maxrss also keeps the high-water mark of the process it was
    forked from (Linux carries it across exec), so a run started by a large parent, e.g. pytest, reads that."""
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except OSError:
        return 0


def runtime_bytes(device: str) -> int:
    """What a rank holds before its model exists: on a CPU this process's resident memory (torch, Lightning, this
    codebase, the data loader), on CUDA the context outside torch's allocator."""
    return resident_bytes() if device == "cpu" else CUDA_RUNTIME_BYTES


def available_bytes(device: torch.device, local_ranks: int) -> int:
    """What one rank may still allocate: the GPU's free memory, or the machine's available RAM (MemAvailable)
    shared by the ranks running on it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib * 1024 // local_ranks


def check_memory(cfg: TrainConfig, world_size: int, local_ranks: int, device: torch.device) -> MemoryPlan:
    """The run's plan. With `memory_check` on, a TrainingError naming a micro-batch that fits when the plan exceeds
    the memory available to each of the `local_ranks` ranks on this machine."""
    runtime = runtime_bytes(device.type)
    plan = plan_memory(cfg, world_size, device.type, runtime)
    if not cfg.memory_check:
        return plan
    available = available_bytes(device, local_ranks)
    if plan.peak_bytes - runtime <= available:
        return plan
    fits = fitting_micro_batches(cfg, world_size, device.type, runtime, available)
    raise TrainingError(
        f"{plan.summary()}: {gib(plan.peak_bytes - runtime)} GiB beyond the runtime, but {gib(available)} GiB are "
        f"available per rank ({local_ranks} on this {device.type}); {fitting_advice(cfg, fits)} "
        "(--memory_check false skips this check)"
    )


def fitting_advice(cfg: TrainConfig, fits: dict[str, int | None]) -> str:
    """What would fit: a smaller micro-batch, activation checkpointing, or more ranks."""
    current, full = fits[cfg.activation_checkpointing], fits["full"]
    if current is not None:
        advice = f"micro_batch_size {current} fits"
        if full is not None and full > current:
            advice += f"; with activation_checkpointing full, micro_batch_size {full} fits"
        return advice
    if full is not None:
        return f"with activation_checkpointing full, micro_batch_size {full} fits"
    return (
        "no micro-batch fits, with or without activation checkpointing: more ranks would shard the parameters, "
        "gradients and optimizer state"
    )


def muon_matrix_fraction(model: Transformer) -> float:
    total = sum(q.numel() for q in model.parameters())
    return sum(q.numel() for name, q in model.named_parameters() if is_hidden_matrix(name)) / total
