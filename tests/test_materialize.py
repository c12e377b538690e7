"""Sharded initialisation (training/materialize.py): a model built on the meta device, sharded by FSDP2, then
materialised shard by shard starts the same on 1 and 2 gloo processes (whole weights and first losses; dense, tied
and MoE with uneven expert shards; random init, init_from a Hugging Face directory and from one of our
checkpoints), and building it holds a rank's shards plus one whole parameter, not the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from formats.checkpoint import save_weights
from model.config import ModelConfig
from tests.conftest import free_port, initial_weights, run_module, tiny_config, write_hf_dir
from training.config import TrainConfig
from training.setup import build_model, shard_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SEED = 7
CONFIGS = {
    "dense": tiny_config(),
    "tied": tiny_config(tie_embeddings=True),
    "moe": tiny_config(num_experts=3, top_k=2),  # 3 experts on 2 ranks: uneven shards of 2 and 1
}
SOURCES = ("random", "hf", "checkpoint")
STEPS = 2
BATCH = 4  # sequences per step over all ranks


def write_sources(cfg: ModelConfig, root: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Trained-looking weights (another seed) as a Hugging Face directory and as a weights-only checkpoint."""
    weights = initial_weights(cfg, seed=1)
    hf = write_hf_dir(cfg, weights, root / "hf")
    save_weights(root / "ckpt", weights, {"config": {"model": cfg.to_dict()}, "weights_only": True}, None)
    return weights, {"hf": hf, "checkpoint": root / "ckpt"}


def first_losses(model: torch.nn.Module, cfg: ModelConfig, group: dist.ProcessGroup) -> list[float]:
    """The global batch's cross-entropy (the MoE balance loss is per rank, so left out) before each of a few AdamW
    steps; each rank of `group` takes its rows of the same global batch."""
    world, rank = group.size(), group.rank()
    tokens = torch.randint(0, cfg.vocab_size, (STEPS, BATCH, 17), generator=torch.Generator().manual_seed(0))
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in tokens[:, rows]:
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item() / world)
    return losses


def start(cfg: ModelConfig, init_from: Path | None, ranks: int) -> dict:
    """Build as train.py does (meta device, parallelize, materialise) over `ranks` ranks (1: each process alone),
    then the whole weights and the first losses."""
    train_cfg = TrainConfig(model=cfg, seed=SEED, init_from=str(init_from) if init_from else None)
    shape = (ranks, dist.get_world_size() // ranks)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = shard_model(build_model(train_cfg), mesh, train_cfg)
    weights = {name: tensor.full_tensor().clone() for name, tensor in model.state_dict().items()}  # before training
    return {"weights": weights, "losses": first_losses(model, cfg, mesh["data_parallel"].get_group())}


def worker(rank: int, port: int, sources: dict[str, dict[str, Path]], out: Path) -> None:
    """On 2 processes: every start sharded over both, and built by each process alone (a 1-rank mesh)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {
            (ranks, kind, source): start(cfg, sources[kind].get(source), ranks)
            for ranks in (1, 2)
            for kind, cfg in CONFIGS.items()
            for source in SOURCES
        }
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[dict, dict]:
    """({kind: source weights}, {kind: {"hf": dir, "checkpoint": dir}})."""
    root = tmp_path_factory.mktemp("sources")
    written = {kind: write_sources(cfg, root / kind) for kind, cfg in CONFIGS.items()}
    return {kind: w for kind, (w, _) in written.items()}, {kind: paths for kind, (_, paths) in written.items()}


@pytest.fixture(scope="module")
def starts(sources, tmp_path_factory) -> dict[tuple[int, str, str], dict]:
    """{(ranks, kind, source): {"weights", "losses"}} for 1 and 2 ranks."""
    out = tmp_path_factory.mktemp("starts") / "starts.pt"
    mp.spawn(worker, args=(free_port(), sources[1], out), nprocs=2)
    return torch.load(out, weights_only=True)


def assert_same_weights(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("source", SOURCES)
def test_two_ranks_start_as_one(kind, source, starts, sources):
    one, two = starts[1, kind, source], starts[2, kind, source]
    expected = initial_weights(CONFIGS[kind], SEED) if source == "random" else sources[0][kind]
    assert_same_weights(one["weights"], expected)
    assert_same_weights(two["weights"], expected)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)


def test_tied_weights_stay_tied(starts):
    weights = starts[2, "tied", "random"]["weights"]
    assert torch.equal(weights["lm_head.weight"], weights["tok_embeddings.weight"])


# 567 MB of fp32 weights in 12 blocks of 45 MB; the largest tensors (embedding, head) 16 MB each.
LARGE_MODEL = dict(n_layers=12, dim=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816, vocab_size=4096)
# What a build allocates besides the weights (FSDP2's bookkeeping, the rotary tables; 8 MB measured).
OVERHEAD_MB = 16


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_building_holds_a_shard_and_one_parameter_not_the_model():
    args = [f"--model.{key}={value}" for key, value in LARGE_MODEL.items()]
    flags = ["--precision=32-true", "--devices=2", "--threads=1"]
    proc = run_module(["-m", "bench.build", "--config=configs/tiny.yaml", *args, *flags])
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in records) == [0, 1]
    for r in records:
        assert r["shard_mb"] == pytest.approx(r["model_mb"] / 2, rel=0.01)
        assert r["peak_increase_mb"] <= r["shard_mb"] + r["largest_param_mb"] + OVERHEAD_MB, r
        assert r["peak_increase_mb"] < 0.6 * r["model_mb"], r
