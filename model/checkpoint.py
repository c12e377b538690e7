"""Checkpoint directories: the on-disk format shared by the trainer and the tools.

    <out_dir>/checkpoints/step-00000100/
        .metadata, __0_0.distcp, ...   torch.distributed.checkpoint of {"model": ..., "optim": ...}, one file per rank
        train_state.json               step, tokens, data state, resolved config, RNG state
        tokenizer.model                the tokenizer the training data was prepared with
        COMPLETE                       written last: a directory without it is never read

A directory only gets its `step-NNNNNNNN` name once complete (it is written under a temporary name and renamed).
Tools read it in one process on a CPU, whatever the number of ranks that wrote it. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from model.config import ModelConfig
from model.llama import Transformer

STATE_FILE = "train_state.json"
COMPLETE = "COMPLETE"
TOKENIZER = "tokenizer.model"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A missing, partial or damaged checkpoint, or one that does not fit; the message names it."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; partial ones (no COMPLETE marker, temp names) are skipped."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_state(path: str | Path) -> dict:
    """The JSON state of a complete checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: damaged checkpoint (its .metadata file is missing)")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        state["config"]["model"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({STATE_FILE}: {e})") from None
    return state


def model_config(state: dict) -> ModelConfig:
    return ModelConfig.from_dict(state["config"]["model"])


def tokenizer_path(path: str | Path) -> Path | None:
    tok = Path(path) / TOKENIZER
    return tok if tok.is_file() else None


def check_same_shape(expected: ModelConfig, found: ModelConfig, where: Path) -> None:
    mismatches = expected.shape_mismatches(found)
    if mismatches:
        raise CheckpointError(f"{where}: checkpoint is of another model shape ({'; '.join(mismatches)})")


def dcp_load(state: dict, path: Path) -> None:
    """torch.distributed.checkpoint load into `state` in place, with damage reported as a CheckpointError."""
    try:
        with warnings.catch_warnings():  # reading in one process, without a process group, is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # DCP wraps every rank's reader errors in a BaseException
        last_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise CheckpointError(f"{path}: damaged checkpoint, its shards cannot be read ({last_line})") from None


def empty_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A model with uninitialised weights (to be loaded), its rotary tables computed."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    model.init_rope()
    return model


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """The model of a checkpoint (any number of writing ranks) in one process, and its JSON state."""
    path = Path(path)
    state = read_state(path)
    model = empty_model(model_config(state), device, dtype)
    weights = model.state_dict()
    dcp_load({"model": weights}, path)
    return model.eval(), state


def save_weights(path: str | Path, weights: dict[str, torch.Tensor], state: dict, tokenizer: Path | None) -> None:
    """A weights-only checkpoint (no optimizer state) in the same format, e.g. a weight average."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save({"model": weights}, checkpoint_id=tmp, no_dist=True)
    finish(tmp, path, state, tokenizer)


def finish(tmp: Path, path: Path, state: dict, tokenizer: Path | None) -> None:
    """Write the JSON state and the tokenizer, then the COMPLETE marker, then rename into place."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
    with open(tmp / COMPLETE, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
