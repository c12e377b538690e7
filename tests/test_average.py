"""tools.average: weight averages of checkpoints, and the loss along the line between two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from formats import average, export
from formats.checkpoint import TOKENIZER, checkpoint_name, load_model, read_state, save_weights, write_checksums
from model.llama import Transformer
from tests.conftest import run_module, run_train, tiny_config, train_losses
from tools import average as average_tool
from tools import perplexity

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 6


def train_checkpoint(out_dir: Path, dataset: Path, seed: int, *extra: str) -> Path:
    run_train([f"--data={dataset}", f"--out_dir={out_dir}", f"--max_steps={STEPS}", f"--seed={seed}", "--eval_every=0",
               *extra])  # fmt: skip
    return out_dir / "checkpoints" / checkpoint_name(STEPS)


@pytest.fixture(scope="module")
def two(dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A short run, and B: A fine-tuned on another data order (so that their average is a sensible model)."""
    root = tmp_path_factory.mktemp("average")
    a = train_checkpoint(root / "a", dataset, 1)
    return a, train_checkpoint(root / "b", dataset, 2, f"--init_from={a}", "--optim.lr=1e-3")


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


def assert_same_weights(x: Path, y: Path) -> None:
    wx, wy = weights_of(x), weights_of(y)
    assert wx.keys() == wy.keys()
    for name in wx:
        assert torch.equal(wx[name], wy[name]), name


def perplexity_loss(capsys, checkpoint: Path, dataset: Path, *extra: str) -> float:
    capsys.readouterr()
    perplexity.main(["--checkpoint", str(checkpoint), "--data", str(dataset), *extra])
    return json.loads(capsys.readouterr().out)["loss"]


def test_average_of_identical_checkpoints_is_identical(two, tmp_path):
    a, _ = two
    state = average.average_checkpoints([a, a, a], tmp_path / "avg")
    assert_same_weights(tmp_path / "avg", a)
    saved = read_state(tmp_path / "avg")
    assert saved["weights_only"] and saved["sources"] == [str(a)] * 3 and saved == state
    assert saved["weights"] == pytest.approx([1 / 3] * 3)


def test_weights_are_normalised(two, tmp_path):
    a, b = two
    average.average_checkpoints([a, b], tmp_path / "w22", [2, 2])
    average.average_checkpoints([a, b], tmp_path / "w11", [1, 1])
    average.average_checkpoints([a, b], tmp_path / "w10", [1, 0])
    average.average_checkpoints([a, b], tmp_path / "w01", [0, 3])
    assert_same_weights(tmp_path / "w22", tmp_path / "w11")
    assert_same_weights(tmp_path / "w10", a)
    assert_same_weights(tmp_path / "w01", b)
    mid, wa, wb = weights_of(tmp_path / "w11"), weights_of(a), weights_of(b)
    torch.testing.assert_close(mid["norm.weight"], (wa["norm.weight"] + wb["norm.weight"]) / 2)


@pytest.mark.parametrize(
    "weights, message", [([1, -1], "non-negative"), ([0, 0], "not all zero"), ([1], "1 weight(s) for 2")]
)
def test_bad_weights_are_refused(two, tmp_path, weights, message):
    a, b = two
    with pytest.raises(SystemExit) as exit_info:
        average_tool.main([str(a), str(b), "--weights", *map(str, weights), "--output", str(tmp_path / "x")])
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    assert not (tmp_path / "x").exists()


def test_existing_output_and_other_tokenizer_are_refused(two, tmp_path):
    a, b = two
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        average.average_checkpoints([a, b], tmp_path / "out")
    with pytest.raises(ValueError, match="must lie outside the checkpoint"):
        average.average_checkpoints([a, b], a.parent, overwrite=True)
    average.average_checkpoints([a, b], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and read_state(tmp_path / "out")["weights_only"]

    other = tmp_path / "other"
    average.average_checkpoints([b], other)
    (other / TOKENIZER).write_bytes((other / TOKENIZER).read_bytes() + b"\0")
    write_checksums(other)  # another tokenizer, not a damaged file
    with pytest.raises(ValueError, match=f"{other}: tokenizer differs"):
        average.average_checkpoints([a, other], tmp_path / "never")


def test_shape_mismatch_names_the_tensor(two, tmp_path):
    a, _ = two
    cfg = tiny_config(ffn_dim=96)
    wider = tmp_path / "wider"
    state = {"config": {"model": cfg.to_dict()}, "weights_only": True}
    save_weights(wider, Transformer(cfg).state_dict(), state, a / TOKENIZER)
    proc = run_module(["-m", "tools.average", str(a), str(wider), "--output", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {wider}: tensor layers.0.ffn.down_proj.weight has shape [64, 96], {a}'s has [64, 128]"
    ]


def test_interpolation_endpoints_are_the_two_models(two, dataset, tmp_path, capsys):
    a, b = two
    plot = tmp_path / "line.png"
    capsys.readouterr()
    argv = ["--interpolate", str(a), str(b), "--data", str(dataset), "--points", "3", "--max-windows", "8"]
    average_tool.main([*argv, "--plot", str(plot)])
    points = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["t"] for p in points] == [0.0, 0.5, 1.0]
    assert points[0]["loss"] == perplexity_loss(capsys, a, dataset, "--max-windows", "8")
    assert points[-1]["loss"] == perplexity_loss(capsys, b, dataset, "--max-windows", "8")
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_average_is_read_by_the_tools(two, dataset, tmp_path, capsys):
    a, b = two
    avg = tmp_path / "avg"
    average.average_checkpoints([a, b], avg)
    export.export(avg, tmp_path / "hf", torch.float32)
    assert (tmp_path / "hf" / "config.json").is_file()
    losses = [perplexity_loss(capsys, c, dataset, "--max-windows", "8") for c in (a, b, avg)]
    assert losses[2] < max(losses[:2])  # on the path from A to its fine-tune B

    run_train([f"--data={dataset}", f"--out_dir={tmp_path / 'tuned'}", "--max_steps=2", f"--init_from={avg}"])
    assert train_losses(tmp_path / "tuned")[1] < 6.0  # a fresh model starts at ln(512) = 6.24
    resumed = run_train([f"--data={dataset}", f"--out_dir={tmp_path / 'r'}", f"--resume={avg}"], check=False)
    assert resumed.returncode != 0 and "weights only" in resumed.stderr
