"""bench.gpu_check's logic on the CPU: every section at tiny shapes, and each kind of failure reported as a row."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from bench import gpu_check
from tests.conftest import run_module


def test_quick_cpu_check_runs_every_section(tmp_path):
    proc = run_module(["-m", "bench.gpu_check", "--quick", "--device=cpu", f"--out={tmp_path}"], timeout=120)
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert list(sections) == ["attention", "moe", "training"]

    attention = {row["backend"]: row["status"] for row in sections["attention"]}
    assert attention["sdpa: flash kernel"] == attention["sdpa: math kernel"] == "ok"
    assert attention["sdpa: efficient kernel"] == "skipped: CUDA only"
    assert all(status == "ok" or status.startswith("skipped") for status in attention.values())

    assert [(row["experts"], row["status"]) for row in sections["moe"]] == [
        ("looped", "ok"),
        ("grouped (torch._grouped_mm)", "ok"),
    ]
    training = sections["training"]
    assert [row["run"] for row in training] == ["dense, eager", "MoE, eager"]
    assert all(row["status"] == "ok" and row["tokens/s"] > 0 and 0 < row["MFU"] < 1 for row in training)
    # bf16 on a CPU runs the CPU plug-in's batched-matmul attention, which is no SDPA kernel.
    assert [(row["block graphs"], row["attention"]) for row in training] == [
        ("eager", "cpu_kernels.attention: no SDPA or flash-attn operator")
    ] * 2
    assert (tmp_path / "gpu_check.md").read_text() in proc.stdout


def test_agreement_flags_a_gradient_outside_bf16_tolerance():
    reference = [torch.linspace(-1, 1, 8), torch.linspace(0, 2, 8)]
    names = ["out", "dx"]
    close = [reference[0] + 2**-9, reference[1] - 2**-8]
    assert gpu_check.agreement(close, reference, names)["status"] == "ok"
    wrong = [reference[0], reference[1] * 1.1]
    assert gpu_check.agreement(wrong, reference, names)["status"].startswith("FAIL")


def test_a_section_that_raises_becomes_a_row(monkeypatch):
    monkeypatch.setattr(gpu_check, "check_moe", lambda plan, device: 1 / 0)
    args = gpu_check.parse_args(["--device=cpu"])
    rows = gpu_check.run_section("moe", gpu_check.QUICK, torch.device("cpu"), args, time.perf_counter() + 60)
    assert rows == [{"experts": "(section)", "status": "error: ZeroDivisionError: division by zero"}]


def test_block_graphs_and_attention_read_from_a_bench_record():
    record = {"graphs": 3, "graph_breaks": 2, "graph_break_first": "Failed to trace builtin operator"}
    assert gpu_check.block_graphs(record) == "3 graphs, 2 breaks: Failed to trace builtin operator"
    assert gpu_check.block_graphs({"graphs": 1, "graph_breaks": 0}) == "one graph"
    record = {"attention_backend": "sdpa", "attention_kernels": ["SDPA flash", "SDPA cuDNN"]}
    assert gpu_check.attention_ran(record) == "sdpa: SDPA flash, SDPA cuDNN"


def test_a_failed_training_run_becomes_a_row_with_its_error():
    run = gpu_check.TrainRun("broken", "configs/no-such-config.yaml", "none", False)
    plan = dataclasses.replace(gpu_check.QUICK, train_runs=(run,))
    rows = gpu_check.check_training(plan, torch.device("cpu"), time.perf_counter() + 120, steps=1, warmup=0)
    assert rows[0]["status"].startswith("error:") and "no-such-config.yaml" in rows[0]["status"]


def test_a_subprocess_past_its_time_is_killed():
    start = time.perf_counter()
    code, _, _ = gpu_check.run_subprocess([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert code is None and time.perf_counter() - start < 10
