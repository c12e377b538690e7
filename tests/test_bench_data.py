"""bench.data on a small corpus: every measurement is printed, the token counts agree, the loader outpaces the
training step."""

from __future__ import annotations

import json

from tests.conftest import TINY_MODEL, run_module

TINY_BENCH = " ".join(
    [f"--model.{k}={v}" for k, v in TINY_MODEL.items()]
    + ["--seq_len=32", "--micro_batch_size=4", "--global_batch_size=4", "--precision=32-true", "--threads=1"]
    + ["--steps=1", "--warmup=0"]
)


def test_data_benchmark_prints_sane_numbers(tmp_path):
    proc = run_module(
        ["-m", "bench.data", "--packages", "email", "--vocab-size=512", "--shard-mb=0.25"]
        + ["--loader-seconds=0.2", f"--bench-args={TINY_BENCH}", f"--work={tmp_path}"],
        timeout=120,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    stages = [r["stage"] for r in records]
    assert (
        stages == ["tokenizer", "prepare", "prepare", "sentencepiece", "sentencepiece", "step", "step"] + ["loader"] * 4
    )
    # prepare with 1 and with 2 workers, and sentencepiece on its own, produce the same tokens
    assert len({r["tokens"] for r in records if "tokens" in r}) == 1
    assert all(r["tokens/s"] > 0 for r in records if "tokens/s" in r)
    assert all(r["input MB/s"] > 0 for r in records if r["stage"] in ("prepare", "sentencepiece"))
    assert all(r["headroom"] > 1 for r in records if r["stage"] == "loader")
    assert "| loader | train_loader, 1.1B shapes 8 x 2048, 1 worker |" in proc.stdout
