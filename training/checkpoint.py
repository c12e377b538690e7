"""Sharded, crash-safe training checkpoints with torch.distributed.checkpoint (format: formats/checkpoint.py).

Every rank writes its own shards into a temporary directory; rank 0 then writes the JSON state, the checksums of
every file and the COMPLETE marker, and renames the directory to `step-NNNNNNNN`. A run killed at any moment leaves
at worst a temporary directory, which `resume: auto` never picks and the next save clears away (a directory at the
final name without COMPLETE is removed before the rename). A save that runs out of disk space is one error naming
the checkpoint; its temporary directory is removed and older checkpoints are left as they were. Loading verifies
the checksums before anything is read (formats/checkpoint.py dcp_load).
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from formats.checkpoint import (
    COMPLETE,
    CheckpointError,
    check_same_shape,
    checkpoint_name,
    complete_checkpoints,
    dcp_load,
    disk_full_as_error,
    finish,
    model_config,
    read_state,
)
from model.config import ModelConfig


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state keyed by parameter name, sharded as the model is (DTensors under FSDP)."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


class Checkpointer:
    """Saves checkpoints under `<out_dir>/checkpoints`, synchronously or in the background, and prunes old ones."""

    def __init__(self, out_dir: Path, keep_last: int, async_save: bool, rank: int, tokenizer: Path | None) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last, self.async_save, self.rank, self.tokenizer = keep_last, async_save, rank, tokenizer
        self.pending: tuple[Future, Path, Path, dict] | None = None
        # A background save runs its collectives on a group of its own, so they never interleave with training's.
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        self.wait()
        final = self.root / checkpoint_name(step)
        if (final / COMPLETE).is_file():  # resumed from this very step: the state on disk is this state
            return
        tmp = self.root / f".{final.name}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".*.tmp"):  # left by a run that was killed while saving
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        shards = training_state(model, optimizer)
        with disk_full_as_error(tmp, final):
            if self.async_save:
                future = dcp.async_save(shards, checkpoint_id=tmp, process_group=self.group)
                self.pending = (future, tmp, final, state)
            else:
                dcp.save(shards, checkpoint_id=tmp)
                self._finish(tmp, final, state)

    def poll(self) -> None:
        """Finish a background save if its shards are all written (called every step; never blocks)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until a background save has finished and is in place."""
        if self.pending is not None:
            future, tmp, final, state = self.pending
            self.pending = None
            with disk_full_as_error(tmp, final):
                future.result()
                self._finish(tmp, final, state)

    def _finish(self, tmp: Path, final: Path, state: dict) -> None:
        # DCP's save returns on the coordinator (rank 0) only after every rank's shards are written.
        if self.rank == 0:
            finish(tmp, final, state, self.tokenizer)
            self._prune()

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resume_path(resume: str, out_dir: Path) -> Path | None:
    """`none` -> None; `auto` -> the newest complete checkpoint of the run (None if there is none); else a path.

    Starting afresh (`none`) where checkpoints exist is refused rather than mixing two runs in one directory.
    """
    found = complete_checkpoints(Path(out_dir) / "checkpoints")
    if resume == "none":
        if found:
            raise CheckpointError(
                f"{out_dir} already holds checkpoints ({found[-1].name}); continue with --resume auto, "
                "or choose another --out_dir"
            )
        return None
    if resume == "auto":
        return found[-1] if found else None
    read_state(resume)  # a clear error for anything that is not a complete checkpoint
    return Path(resume)


def load_training_state(
    path: Path, cfg_model: ModelConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_name: str
) -> dict:
    """Restore model and optimizer in place (resharding to this world size) and return the JSON state."""
    state = read_state(path)
    check_same_shape(cfg_model, model_config(state), path)
    if state.get("weights_only"):
        raise CheckpointError(f"{path}: holds weights only (no optimizer state); it cannot be resumed")
    saved_name = state["config"].get("optim", {}).get("name", "adamw")
    if saved_name != optim_name:
        raise CheckpointError(f"{path}: written by optim.name {saved_name}, this run has {optim_name}")
    shards = training_state(model, optimizer)
    dcp_load(shards, path)
    set_model_state_dict(model, shards["model"])
    set_optimizer_state_dict(model, optimizer, shards["optim"])
    return state
