"""The memory plan (training/memory.py, tools/plan.py): its activation counts against what autograd saves, its peak
against a measured run, its one-line errors, and train.py stopping before an out-of-memory crash."""

from __future__ import annotations

import json

import pytest
import torch

from cpu_kernels import apply_cpu_kernels
from model.llama import Transformer
from tests.conftest import run_module, run_train, tiny_config
from tools import plan
from training.config import parse_config
from training.memory import GiB, Kernels, block_saved, embedding_saved, loss_buffers, norm_saved, plan_memory


def autograd_saved_bytes(model: Transformer, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward with targets (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1], tokens[:, 1:])
    return sum(storages.values())


def planned_saved_bytes(cfg, batch: int, seq: int, dtype: torch.dtype, kernels: Kernels) -> int:
    n, c = batch * seq, dtype.itemsize
    blocks = cfg.n_layers * block_saved(batch, seq, cfg, c, kernels)
    return blocks + norm_saved(n, cfg.dim, c, kernels) + loss_buffers(n, cfg, c, kernels)[0] + embedding_saved(n)


@pytest.mark.parametrize("experts", [0, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plugin", [False, True])
@pytest.mark.parametrize("seq", [64, 320])  # 320: the plug-in attention's second block of query positions
def test_planned_activations_are_what_autograd_saves(experts, dtype, plugin, seq):
    """Dense: the plan's count is exact up to the few small tensors it leaves out (rotary tables, MoE router
    indices). MoE: the plan pads each expert's rows by half the kernel's alignment, the average."""
    cfg = tiny_config(num_experts=experts, max_seq_len=seq, dim=128, ffn_dim=256)
    torch.manual_seed(0)
    model = Transformer(cfg, grouped_mm=experts > 0 and dtype == torch.bfloat16)
    if plugin:
        apply_cpu_kernels(model)
    model = model.to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq + 1))
    measured = autograd_saved_bytes(model, tokens)
    planned = planned_saved_bytes(cfg, 2, seq, dtype, Kernels("cpu", plugin, "sdpa"))
    low, high = (0.98, 1.0) if not experts else (0.9, 1.1)
    assert low * measured <= planned <= high * measured, (planned, measured)


def test_plan_against_a_measured_run():
    """bench.step plans the run it measures (tiny, 1 process, activation checkpointing none and full): the planned
    tensors within 15% of the peak bytes glibc's heap has in use; the planned peak within 20% of the peak RSS, which
    also holds the freed memory glibc keeps for reuse (training/setup.py: keep_freed_memory; docs/performance.md)."""
    for ac in ("none", "full"):
        args = ["-m", "bench.step", "--config=configs/tiny.yaml", "--steps=2", "--warmup=1", "--threads=1"]
        proc = run_module([*args, f"--activation_checkpointing={ac}", "--optim.name=adamw", "--heap=true"])
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        tensors = record["planned_peak_mb"] - record["planned_runtime_mb"]
        in_use = record["peak_heap_in_use_mb"] - record["heap_in_use_at_start_mb"]
        assert 0.85 <= tensors / in_use <= 1.15, record
        assert 0.8 <= record["planned_peak_mb"] / record["peak_rss_mb"] <= 1.2, record


def test_sharding_divides_the_state_and_checkpointing_the_activations():
    cfg = parse_config(["--config=configs/tinyllama-1.1b.yaml", "--seq_len=2048", "--micro_batch_size=8"])
    one, eight = plan_memory(cfg, 1, "cuda", 0), plan_memory(cfg, 8, "cuda", 0)
    for part in ("parameters", "optimizer"):
        assert eight.breakdown[part] == pytest.approx(one.breakdown[part] / 8, rel=0.01)
    assert one.breakdown["parameters"] == pytest.approx(1_100_048_384 * 4, rel=0.001)  # fp32 master weights
    cfg.activation_checkpointing = "full"
    assert plan_memory(cfg, 8, "cuda", 0).peak_bytes < eight.peak_bytes - 10 * GiB


def test_plan_command_prints_json_and_the_micro_batch_that_fits(capsys):
    plan.main(["--config=configs/tinyllama-1.1b.yaml", "--devices=8", "--accelerator=cuda", "--device-memory=80"]
              + ["--json=true"])  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert record["peak_bytes"] == sum(record["breakdown"].values())
    fits = record["max_micro_batch"]
    assert fits["full"] >= fits["none"] >= 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.n_heads=30"], "model.dim (2048) must be divisible by model.n_heads (30)"),
        (["--micro_batch_size=512", "--devices=4"], "micro_batch_size (512) x world size (4) exceeds"),
        (["--device-memory=lots"], "device_memory"),
        (["--device-memory=-3"], "--device-memory must be a positive number"),
    ],
)
def test_plan_of_a_config_that_cannot_run_is_a_one_line_error(flags, message):
    with pytest.raises(SystemExit) as exit:
        plan.main(["--config=configs/tinyllama-1.1b.yaml", *flags])
    assert exit.value.code.startswith("error:") and "\n" not in exit.value.code and message in exit.value.code


def test_train_stops_before_building_a_model_that_does_not_fit(dataset, tmp_path):
    """A model of some 10^10 parameters on this machine: one line naming the plan, nothing written."""
    huge = ["--model.dim=16384", "--model.n_heads=64", "--model.n_kv_heads=8", "--model.ffn_dim=65536"]
    proc = run_train([f"--data={dataset}", f"--out_dir={tmp_path / 'run'}", *huge], check=False)
    assert proc.returncode == 1
    assert "error: planned peak" in proc.stderr and "memory_check false" in proc.stderr, proc.stderr
    assert "no micro-batch fits" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
