"""Weight averages of compatible checkpoints (model soups, WARM, checkpoint averaging), and the models on the
straight line between two of them; the command is tools/average.py (`python -m tools.average`).

The average is a weights-only checkpoint in the trainer's format (its train_state.json says "weights_only": true
and records the sources and their weights; the model config is the first checkpoint's). tools/, formats/export.py
and train.py --init_from read it; training cannot resume from it (it has no optimizer state). The weights are
normalised to sum to 1. The checkpoints must hold tensors of the same names and shapes and the same tokenizer.
The mean is taken in fp32, one checkpoint at a time: memory stays at about two models, whatever their number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from data.tokenizer import file_sha256
from formats.checkpoint import (
    CheckpointError,
    empty_model,
    load_model,
    model_config,
    read_state,
    save_weights,
    tokenizer_path,
)
from formats.export import staged_dir
from model.config import ModelConfig
from model.llama import Transformer


def normalised(weights: list[float] | None, n: int) -> list[float]:
    """Mixing weights that sum to 1 (equal ones by default)."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} weight(s) for {n} checkpoint(s)")
    if not all(w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights must be non-negative and not all zero, got {weights}")
    return [w / sum(weights) for w in weights]


def shared_tokenizer(paths: list[Path]) -> Path | None:
    """The tokenizer file every checkpoint was saved with (a checksum mismatch, or a missing one, is an error)."""
    files = [tokenizer_path(p) for p in paths]
    sums = [file_sha256(f) if f else None for f in files]
    for path, checksum in zip(paths[1:], sums[1:]):
        if checksum != sums[0]:
            raise CheckpointError(f"{path}: tokenizer differs from {paths[0]}'s (checksum)")
    return files[0]


def tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights by name; tied embeddings appear once, so they are averaged once."""
    return dict(model.named_parameters())


def tensor_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The shapes of the weights a checkpoint of this config holds (built on the meta device: nothing is loaded)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Transformer(cfg).named_parameters()}


def check_compatible(paths: list[Path]) -> None:
    """The same tensor names and shapes in every checkpoint; the error names the first tensor that differs."""
    first = tensor_shapes(model_config(read_state(paths[0])))
    for path in paths[1:]:
        shapes = tensor_shapes(model_config(read_state(path)))
        for name in sorted(first.keys() | shapes.keys()):
            if name not in shapes:
                raise CheckpointError(f"{path}: has no tensor {name} (which {paths[0]} has)")
            if name not in first:
                raise CheckpointError(f"{path}: has tensor {name}, which {paths[0]} has not")
            if shapes[name] != first[name]:
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {list(shapes[name])}, {paths[0]}'s has {list(first[name])}"
                )


@torch.no_grad()
def average_models(paths: list[Path], weights: list[float]) -> Transformer:
    """sum_i w_i x_i (weights summing to 1) as a running weighted mean: mean += (w_i / W_i) (x_i - mean), W_i the
    weight seen so far. torch.lerp keeps the exact cases exact: identical checkpoints average to themselves, a
    weight of 0 changes nothing, and the first positive weight copies its checkpoint."""
    mean, _ = load_model(paths[0])  # fp32, and the accumulator from here on
    accumulators = tensors(mean)
    seen = weights[0]
    for path, weight in zip(paths[1:], weights[1:]):
        model, _ = load_model(path)
        seen += weight
        if seen > 0:
            for name, x in tensors(model).items():
                accumulators[name].lerp_(x, weight / seen)
        del model
    return mean


def check_output(output: Path, sources: list[Path], overwrite: bool) -> None:
    """--output must not hold a source (--overwrite would delete it) and must be new or empty unless --overwrite."""
    out = output.resolve()
    for source in sources:
        if out.is_relative_to(source.resolve()) or source.resolve().is_relative_to(out):
            raise ValueError(f"--output {output} must lie outside the checkpoint {source}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output}: exists and is not empty (add --overwrite to replace it)")


def average_checkpoints(
    paths: list[str | Path], output: str | Path, weights: list[float] | None = None, overwrite: bool = False
) -> dict:
    """Write the weighted average of `paths` as a weights-only checkpoint at `output`; returns its JSON state."""
    paths, output = [Path(p) for p in paths], Path(output)
    weights = normalised(weights, len(paths))
    check_output(output, paths, overwrite)
    check_compatible(paths)  # and complete: all of them, before any is loaded
    tokenizer = shared_tokenizer(paths)
    mean = average_models(paths, weights)
    state = {
        "config": read_state(paths[0])["config"],
        "weights_only": True,
        "sources": [str(p) for p in paths],
        "weights": weights,
    }
    with staged_dir(output) as staged:  # a failed write (a full disk) leaves an older average at `output` intact
        save_weights(staged, mean.state_dict(), state, tokenizer)
    return state


@torch.no_grad()
def interpolated_models(a: Path, b: Path, points: int) -> Iterator[tuple[float, Transformer]]:
    """(t, (1 - t) A + t B) at `points` evenly spaced t in [0, 1]; the endpoints are A and B exactly. The model
    yielded is one buffer, overwritten at the next point. Memory: three models (A, B and the point between them)."""
    if points < 2:
        raise ValueError(f"--points must be at least 2, got {points}")
    check_compatible([a, b])
    model_a, model_b = load_model(a)[0], load_model(b)[0]
    point = empty_model(model_a.cfg).eval()
    start, end = tensors(model_a), tensors(model_b)
    for i in range(points):
        t = i / (points - 1)
        for name, p in tensors(point).items():
            p.copy_(start[name]).lerp_(end[name], t)
        yield t, point
