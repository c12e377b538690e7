"""Shared fixtures: a small prepared dataset, tiny model shapes, and a way to run train.py as users do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.prepare import prepare
from data.sources import stdlib_files
from formats.export import write_json, write_weights
from formats.hf import hf_config, hf_state_dict
from model.config import ModelConfig
from model.llama import Transformer

REPO = Path(__file__).resolve().parent.parent

# A 2-layer model that trains in seconds on one thread.
TINY_MODEL = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=64)
TINY_ARGS = [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--seq_len=32",
    "--micro_batch_size=4",
    "--global_batch_size=8",
    "--eval_windows=8",
    "--sample_prompt=",
    "--precision=32-true",
    "--threads=1",
    "--optim.warmup_steps=2",
    "--optim.lr=3e-3",
    "--optim.min_lr=3e-4",
    # AdamW + cosine whatever configs/tiny.yaml's default (Muon + WSD): exact 1- vs 2-process comparisons need
    # AdamW's elementwise update (test_muon_wsd.py runs Muon with its own tolerance)
    "--optim.name=adamw",
    "--optim.schedule=cosine",
    "--log_every=1",
]


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, **overrides})


def initial_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The plain model's weights filled by a fresh CPU generator seeded with `seed`: what a run with that seed starts
    from, on any number of ranks (training/materialize.py)."""
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.state_dict()


def write_hf_dir(cfg: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> Path:
    """`weights` as a Hugging Face directory (config.json, weights in several indexed safetensors files)."""
    path.mkdir(parents=True)
    write_weights(hf_state_dict(cfg, weights), path, max_shard_size="100KB")
    write_json(path / "config.json", hf_config(cfg, torch.float32, bos_id=1, eos_id=2))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """The stdlib's `email` package prepared with a 512-token BPE tokenizer (~150k tokens)."""
    out = tmp_path_factory.mktemp("data") / "email"
    prepare(stdlib_files(packages=["email"]), out, vocab_size=512, val_fraction=0.1, shard_mb=0.1, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    return env


def run_module(args: list[str], timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root, as a user runs it; check=True fails the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=kwargs.pop("env", subprocess_env()),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"python {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_train(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return run_module(["train.py", *TINY_ARGS, *args], **kwargs)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}
