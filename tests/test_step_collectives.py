"""train_step reduces everything with one all_reduce and no barrier, counted in two gloo processes under torchrun."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MODEL, free_port, run_module

WORKER = "tests/step_collectives_worker.py"


@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "moe"])
def test_one_all_reduce_and_no_barrier_per_step(num_experts, tmp_path):
    out = tmp_path / "counts"
    port = f"--master-port={free_port()}"
    args = ["-m", "torch.distributed.run", "--nproc-per-node=2", port, WORKER, str(out)]
    run_module([*args, json.dumps({**TINY_MODEL, "num_experts": num_experts})], timeout=200)
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"counts.{rank}").read_text())
        assert counts == {"all_reduce": 1, "barrier": 0}, (rank, counts)
