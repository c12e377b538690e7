"""Training scalars to TensorBoard and to metrics.jsonl, and the device peaks that MFU is measured against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak where it is known (CPU peaks are measured by eval.bench instead)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), None)


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
