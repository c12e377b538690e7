"""Training scalars to TensorBoard and to metrics.jsonl, and the device peaks that MFU is measured against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

# Dense bf16 tensor-core peaks (FLOP/s), by the name torch.cuda.get_device_name reports. Each is the datasheet's
# BF16 Tensor Core figure without sparsity (the sheets print the 2:4-sparse figure, twice this, next to it).
GPU_BF16_PEAK = {
    "NVIDIA GB200": 2500e12,  # GB200 NVL72 datasheet: 360 PFLOPS sparse over 72 GPUs
    "NVIDIA B200": 2250e12,  # HGX B200 datasheet: 36 PFLOPS sparse over 8 GPUs
    "NVIDIA H200": 989e12,  # H200 datasheet, SXM
    "NVIDIA H200 NVL": 835e12,  # H200 datasheet, NVL
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 datasheet, SXM
    "NVIDIA H100 PCIe": 756e12,  # H100 datasheet, PCIe
    "NVIDIA H100 NVL": 835e12,  # H100 NVL datasheet
    "NVIDIA H800": 989e12,  # H800 datasheet, SXM (the H100 SXM's compute)
    "NVIDIA H800 PCIe": 756e12,  # H800 datasheet, PCIe
    "NVIDIA A100-SXM4-80GB": 312e12,  # A100 datasheet, every variant
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,  # A800 datasheet (the A100's compute)
    "NVIDIA A800 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,  # L40S datasheet
    "NVIDIA L4": 121e12,  # L4 datasheet
    "NVIDIA A10": 125e12,  # A10 datasheet
    "NVIDIA A10G": 125e12,  # AWS's A10 variant: no NVIDIA sheet, taken as the A10's
    "NVIDIA GeForce RTX 4090": 165e12,  # Ada whitepaper: FP16/BF16 with FP32 accumulation
}
# For names not in the table (other memory sizes, form factors): the most specific family name they contain.
GPU_FAMILY_PEAK = {
    "GB200": GPU_BF16_PEAK["NVIDIA GB200"],
    "B200": GPU_BF16_PEAK["NVIDIA B200"],
    "H200 NVL": GPU_BF16_PEAK["NVIDIA H200 NVL"],
    "H200": GPU_BF16_PEAK["NVIDIA H200"],
    "H100 NVL": GPU_BF16_PEAK["NVIDIA H100 NVL"],
    "H100 PCIe": GPU_BF16_PEAK["NVIDIA H100 PCIe"],
    "H100": GPU_BF16_PEAK["NVIDIA H100 80GB HBM3"],
    "H800 PCIe": GPU_BF16_PEAK["NVIDIA H800 PCIe"],
    "H800": GPU_BF16_PEAK["NVIDIA H800"],
    "A100": GPU_BF16_PEAK["NVIDIA A100-SXM4-80GB"],
    "A800": GPU_BF16_PEAK["NVIDIA A800-SXM4-80GB"],
}


def bf16_peak_by_name(name: str) -> float | None:
    """The exact name's peak, else the longest family name it contains, else None."""
    if name in GPU_BF16_PEAK:
        return GPU_BF16_PEAK[name]
    families = sorted((f for f in GPU_FAMILY_PEAK if f.lower() in name.lower()), key=len, reverse=True)
    return GPU_FAMILY_PEAK[families[0]] if families else None


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak where it is known (CPU peaks are measured by bench.step instead); for an
    unknown GPU, None and a one-line notice, so that no wrong MFU is logged."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak_by_name(name)
    if peak is None:
        print(f"no bf16 peak known for {name!r}: MFU is not logged (add it to training/metrics.py GPU_BF16_PEAK)")
    return peak


class Throughput:
    """Training tokens/s (and MFU where the peak is known) over the steps since the last read."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, peak_flops: float | None) -> None:
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def read(self) -> dict:
        tokens_per_s = self.tokens_per_step * self.steps / self.seconds
        self.seconds, self.steps = 0.0, 0
        if not self.peak:
            return {"tokens_per_s": tokens_per_s}
        return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak}


class MetricsLogger:
    """One JSON object per logged step in `<out_dir>/metrics.jsonl` and the same scalars in TensorBoard.

    On resume from step S, records past S (written before the run was interrupted) are dropped from both, so the
    files read as one uninterrupted run.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key == "step":
                continue
            if key == "expert_load":  # [layer][expert] fractions of routed slots
                for layer, loads in enumerate(value):
                    for expert, load in enumerate(loads):
                        self.tb.add_scalar(f"expert_load/layer{layer}/expert{expert}", load, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
