"""The read-only tools: bench, perplexity and generate, run as users run them; the trainer's evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.fabric import Fabric

from data.stream import TokenStream
from data.tokenizer import TextBytes, Tokenizer
from model.llama import Transformer
from tests.conftest import read_metrics, run_module, run_train, tiny_config
from training.config import TrainConfig
from training.loop import evaluate


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
    assert scored["bpb"] == pytest.approx(val["val_bpb"], rel=1e-5)
    assert scored["tokens"] == 8 * 32 and scored["ppl"] == pytest.approx(2.718281828 ** scored["loss"])
    assert scored["bpb"] == pytest.approx(scored["loss"] * scored["tokens"] / scored["bytes"] / math.log(2))


def test_perplexity_of_a_text_file(trained, tmp_path):
    text = tmp_path / "t.py"
    text.write_text("import email  # ✓\n" * 40)
    scored = tool("tools.perplexity", f"--checkpoint={trained}", f"--text-file={text}")
    assert scored["tokens"] > 40 and scored["loss"] > 0
    assert scored["bytes"] == text.stat().st_size  # the whole file is scored
    assert scored["bpb"] == pytest.approx(scored["loss"] * scored["tokens"] / scored["bytes"] / math.log(2))


def document_bytes(tok: Tokenizer, ids: list[int]) -> int:
    """UTF-8 bytes of the text of a token stretch that starts a document, decoded by sentencepiece document by
    document (each EOS ends one)."""
    documents, current = [], []
    for i in ids:
        if i == tok.eos_id:
            documents.append(current)
            current = []
        else:
            current.append(i)
    return sum(len(tok.decode(d).encode()) for d in [*documents, current])


def test_val_bpb_equals_a_hand_computation(dataset):
    """A model whose head is zero predicts every token with probability 1/V: ln V nats per token, so bits per byte
    are log2(V) x tokens / bytes, the bytes those of the text the 8 windows of 32 score (tokens 1-256 of the
    validation stream), decoded by sentencepiece."""
    cfg = TrainConfig(model=tiny_config(), seq_len=32, micro_batch_size=4, eval_windows=8)
    model = Transformer(cfg.model)
    torch.nn.init.zeros_(model.lm_head.weight)
    tok = Tokenizer(dataset / "tokenizer.model")
    fabric = Fabric(accelerator="cpu", devices=1)
    metrics = evaluate(fabric, model, [TokenStream(dataset, "val")], [1.0], cfg, TextBytes(tok))
    stream = TokenStream(dataset, "val").read(0, 8 * 32 + 1).tolist()
    scored_bytes = document_bytes(tok, stream) - document_bytes(tok, stream[:1])
    assert metrics["val_loss"] == pytest.approx(math.log(512), rel=1e-6)
    assert metrics["val_bpb"] == pytest.approx(math.log2(512) * 8 * 32 / scored_bytes, rel=1e-6)
    assert 1.5 < scored_bytes / 256 < 3  # bytes per token of a 512-piece BPE on Python source


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
