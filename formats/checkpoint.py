"""Checkpoint directories: the on-disk format shared by the trainer and the tools.

    <out_dir>/checkpoints/step-00000100/
        .metadata, __0_0.distcp, ...   torch.distributed.checkpoint of {"model": ..., "optim": ...}, one file per rank
        train_state.json               step, tokens, data state, resolved config, RNG state
        tokenizer.model                the tokenizer the training data was prepared with
        checksums.json                 size and CRC-32 of every file above, written after them
        COMPLETE                       written last: a directory without it is never read

A directory only gets its `step-NNNNNNNN` name once complete (it is written under a temporary name and renamed).
Tools read it in one process on a CPU, whatever the number of ranks that wrote it.

Nothing loaded is trusted. Every file is checked against checksums.json before it is used (a checkpoint written
before checksums were recorded loads with a warning that it is unverified); the step in train_state.json must agree
with the directory name and the data position; `.metadata`, the one pickle DCP writes, is read by an unpickler that
admits only DCP's own metadata records; and the non-tensor items of the optimizer state are unpickled with
torch.load(weights_only=True) (DCP's own planner unpickles them without restriction). Any failure is a
CheckpointError naming the file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from model.config import ModelConfig
from model.llama import Transformer

STATE_FILE = "train_state.json"
COMPLETE = "COMPLETE"
TOKENIZER = "tokenizer.model"
CHECKSUMS = "checksums.json"
METADATA = ".metadata"
PREFIX = "step-"
BLOCK = 4 << 20  # bytes hashed at a time: memory stays flat whatever the file size


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


# Checksums: size and CRC-32 of each file, which catches flipped bits and truncation (not a forger, who can rewrite
# checksums.json too: the restricted unpickling below is what stands against crafted files).


def file_checksum(path: Path) -> dict:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)
    return {"bytes": path.stat().st_size, "crc32": f"{crc:08x}"}


def write_checksums(directory: Path) -> None:
    """checksums.json over every file of `directory` (written before COMPLETE, which it does not cover)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in (COMPLETE, CHECKSUMS))
    manifest = {p.name: file_checksum(p) for p in files}
    (directory / CHECKSUMS).write_text(json.dumps({"files": manifest}, indent=1) + "\n")


def read_checksums(path: Path) -> dict[str, dict] | None:
    """{file name: checksum} of a checkpoint, or None for one written before checksums were recorded."""
    manifest = path / CHECKSUMS
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        if not all(Path(name).name == name and isinstance(c, dict) for name, c in files.items()):
            raise TypeError("'files' is not a mapping of file names in the checkpoint to checksums")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: damaged checksum manifest ({e})") from None
    return files


def verify_file(path: Path, name: str, checksums: dict[str, dict]) -> None:
    """`path/name` exists and matches its recorded checksum."""
    if name not in checksums:
        raise CheckpointError(f"{path}: damaged checkpoint, {name} is not covered by {CHECKSUMS}")
    if not (path / name).is_file():
        raise CheckpointError(f"{path}: damaged checkpoint, {name} is missing (listed in {CHECKSUMS})")
    expected, found = checksums[name], file_checksum(path / name)
    if found["bytes"] != expected.get("bytes"):
        raise CheckpointError(
            f"{path}: damaged checkpoint, {name} has {found['bytes']} bytes where {expected.get('bytes')} were written"
        )
    if found["crc32"] != expected.get("crc32"):
        raise CheckpointError(f"{path}: damaged checkpoint, {name} does not match its checksum in {CHECKSUMS}")


def verify_if_recorded(path: Path, name: str) -> None:
    checksums = read_checksums(path)
    if checksums is not None:
        verify_file(path, name, checksums)


def verify_checkpoint(path: Path) -> None:
    """Every file of the checkpoint against its checksum, then its DCP metadata (read safely) against the files."""
    checksums = read_checksums(path)
    if checksums is None:
        print(f"warning: {path}: no {CHECKSUMS} (written before checksums were recorded): unverified", file=sys.stderr)
    else:
        for name in sorted({METADATA, *checksums}):
            verify_file(path, name, checksums)
    metadata = read_metadata(path / METADATA)
    shards = {info.relative_path for info in metadata.storage_data.values()}
    unlisted = sorted(shards - set(checksums or shards))
    if unlisted:  # a shard added after the checksums were written
        raise CheckpointError(f"{path}: damaged checkpoint, {unlisted[0]} is not covered by {CHECKSUMS}")


# DCP's metadata: a pickle, read with only the classes that ours hold (listed by unpickling them with a logging
# find_class, dense and MoE, one and two ranks). Calling any of them builds a record and runs nothing else.

METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "BytesStorageMetadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a torch.layout up by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that is not on the list: loading it could run anything."""


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in METADATA_CLASSES.get(module, ()) or (module == "torch" and is_dtype_name(name)):
            return super().find_class(module, name)
        raise RefusedGlobal(f"refused to unpickle {module}.{name}: a checkpoint's metadata holds only DCP's records")


def is_dtype_name(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


def read_metadata(file: Path) -> Metadata:
    """DCP's `.metadata` file, unpickled with only DCP's own metadata classes admitted."""
    try:
        with open(file, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except RefusedGlobal as e:
        raise CheckpointError(f"{file}: {e}") from None
    except Exception as e:  # a damaged pickle raises almost anything
        raise CheckpointError(f"{file}: damaged checkpoint metadata ({str(e) or type(e).__name__})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: damaged checkpoint metadata (holds a {type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by read_metadata."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return metadata


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor items (optimizer hyperparameters) unpickled with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_state(path: str | Path) -> dict:
    """The JSON state of a complete checkpoint directory, checked against its checksum and its directory name."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    if not (path / METADATA).is_file():
        raise CheckpointError(f"{path}: damaged checkpoint (its {METADATA} file is missing)")
    verify_if_recorded(path, STATE_FILE)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        state["config"]["model"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({STATE_FILE}: {e})") from None
    if not state.get("weights_only"):
        check_progress(state, path / STATE_FILE)
    return state


def check_progress(state: dict, file: Path) -> None:
    """The step of a training state is its directory's, and the data position is that step's: the samples drawn
    are the datasets' counts summed, and `step` global batches when the batch stayed constant (its token count
    says so: tokens = step x global_batch_size x seq_len)."""
    try:
        step, tokens, data, cfg = state["step"], state["tokens"], state["data"], state["config"]
        samples, batch, seq_len = data["samples"], cfg["global_batch_size"], cfg["seq_len"]
        drawn = sum(data["per_dataset"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: damaged checkpoint state (no {e})") from None
    named = re.fullmatch(rf"{PREFIX}(\d+)", file.parent.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{file}: 'step' is {step} in a checkpoint named {file.parent.name}")
    if samples != drawn:
        raise CheckpointError(f"{file}: 'data.samples' is {samples}, but 'data.per_dataset' sums to {drawn}")
    if tokens == step * batch * seq_len and samples != step * batch:
        raise CheckpointError(f"{file}: 'data.samples' is {samples}, not step x global_batch_size = {step * batch}")


def model_config(state: dict) -> ModelConfig:
    return ModelConfig.from_dict(state["config"]["model"])


def tokenizer_path(path: str | Path) -> Path | None:
    """The checkpoint's tokenizer.model (checked against its checksum), if it has one."""
    tok = Path(path) / TOKENIZER
    if not tok.is_file():
        return None
    verify_if_recorded(tok.parent, TOKENIZER)
    return tok


def check_same_shape(expected: ModelConfig, found: ModelConfig, where: Path) -> None:
    mismatches = expected.shape_mismatches(found)
    if mismatches:
        raise CheckpointError(f"{where}: checkpoint is of another model shape ({'; '.join(mismatches)})")


def dcp_load(state: dict, path: Path) -> None:
    """torch.distributed.checkpoint load into `state` in place, after verify_checkpoint; damage is a CheckpointError."""
    verify_checkpoint(path)
    try:
        with warnings.catch_warnings():  # reading in one process, without a process group, is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(path), planner=WeightsOnlyPlanner())
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
    with disk_full_as_error(tmp, path):
        dcp.save({"model": weights}, checkpoint_id=tmp, no_dist=True)
        finish(tmp, path, state, tokenizer)


def finish(tmp: Path, path: Path, state: dict, tokenizer: Path | None) -> None:
    """Write the JSON state, the tokenizer and the checksums, then the COMPLETE marker, then rename into place."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
    write_checksums(tmp)
    with open(tmp / COMPLETE, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    remove_incomplete(path)
    os.replace(tmp, path)


def remove_incomplete(path: Path) -> None:
    """A directory without COMPLETE at the target name (a save interrupted mid-rename, or a copy) is never
    read: it goes, or the rename would fail on it at every save of this step."""
    if path.is_dir() and not (path / COMPLETE).is_file():
        shutil.rmtree(path)
        print(f"{path}: removed an incomplete checkpoint (no {COMPLETE} marker) to save it again", file=sys.stderr)


@contextmanager
def disk_full_as_error(tmp: Path, path: Path) -> Iterator[None]:
    """A save that runs out of space: its partial directory is removed and it becomes one CheckpointError."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{path}: not saved, no space left on device (its partial directory was removed; "
            "older checkpoints were not touched)"
        ) from None


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: torch's writer reports it as "unexpected pos", DCP wraps it per rank."""
    if e is None:
        return False
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if isinstance(e, CheckpointException) and any(is_disk_full(exc) for exc, _ in e.failures.values()):
        return True
    return is_disk_full(e.__cause__ or e.__context__)
