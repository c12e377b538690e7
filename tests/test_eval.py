"""The read-only tools: bench, perplexity and generate, run as users run them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, run_module, run_train


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    run_train([f"--data={dataset}", f"--out_dir={out}", "--max_steps=4", "--eval_every=4"])
    return out / "checkpoints" / "step-00000004"


def tool(*args: str) -> dict:
    return json.loads(run_module(["-m", *args]).stdout.strip().splitlines()[-1])


def test_perplexity_on_the_validation_split_equals_the_trainers(trained, dataset):
    val = [r for r in read_metrics(trained.parent.parent) if "val_loss" in r][-1]
    scored = tool("tools.perplexity", f"--checkpoint={trained}", f"--data={dataset}", "--seq-len=32", "--max-windows=8")
    assert scored["loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    assert scored["tokens"] == 8 * 32 and scored["ppl"] == pytest.approx(2.718281828 ** scored["loss"])


def test_perplexity_of_a_text_file(trained, tmp_path):
    text = tmp_path / "t.py"
    text.write_text("import email\n" * 40)
    scored = tool("tools.perplexity", f"--checkpoint={trained}", f"--text-file={text}")
    assert scored["tokens"] > 40 and scored["loss"] > 0


def test_generate_greedy_is_deterministic_and_json(trained):
    args = (
        "tools.generate",
        f"--checkpoint={trained}",
        "--prompt=def ",
        "--temperature=0",
        "--max-new-tokens=8",
        "--json",
    )
    first, second = tool(*args), tool(*args)
    assert first == second and first["prompt_ids"][0] == 1 and 0 < len(first["output_ids"]) <= 8
    sampled = run_module(["-m", "tools.generate", f"--checkpoint={trained}", "--prompt=def ", "--top-p=0.9",
                          "--top-k=20", "--max-new-tokens=8"]).stdout  # fmt: skip
    assert sampled.startswith("def ")


def test_bench_counts_on_meta_and_times_steps():
    counts = tool("bench.step", "--config=configs/tinyllama-1.1b.yaml", "--steps=0")
    assert counts["params_total"] == counts["params_active"] == 1_100_048_384
    moe = tool("bench.step", "--config=configs/tinyllama-1.1b-moe.yaml", "--steps=0")
    assert moe["params_total"] == 6_429_272_064 and moe["params_active"] == 1_861_675_008
    proc = run_module(["-m", "bench.step", "--model.n_layers=1", "--global_batch_size=8", "--steps=2", "--warmup=1",
                       "--threads=1", "--profile=true"])  # fmt: skip
    timed = json.loads(proc.stdout)
    assert timed["tokens_per_s"] > 0 and 0 < timed["mfu"] < 1 and timed["peak_rss_mb"] > 0
    assert "aten::mm" in proc.stderr and "Self CPU" in proc.stderr  # the profile's operator table


def test_tool_errors_are_one_line(tmp_path):
    proc = run_module(["-m", "tools.perplexity", f"--checkpoint={tmp_path}", f"--text-file={tmp_path}"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "not a complete checkpoint" in proc.stderr
