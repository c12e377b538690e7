"""MFU peaks: a GPU's dense bf16 peak by its exact name, then by its most specific family, unknown -> None."""

from __future__ import annotations

import pytest
import torch

from training.metrics import device_peak_flops

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A800-SXM4-40GB", 312e12),  # not in the table: by family
        ("NVIDIA H100 SXM5 64GB", 989e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA GB200", 2500e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
    ],
)
def test_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(CUDA) == peak


def test_unknown_gpu_has_no_peak_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H20")
    assert device_peak_flops(CUDA) is None
    assert "no bf16 peak known for 'NVIDIA H20'" in capsys.readouterr().out


def test_cpu_has_no_table_peak():
    assert device_peak_flops(torch.device("cpu")) is None
