"""Binary token shards and the dataset manifest.

A shard is a 64-byte header followed by the token array:

    magic      8 bytes  b"SLMTOKS\\0"
    version    u32      1
    itemsize   u32      2 (uint16, vocab <= 65536) or 4 (uint32)
    n_tokens   u64
    vocab_size u32
    reserved   u32
    tokenizer  32 bytes sha256 of the tokenizer model file

Documents are concatenated with EOS after each; there is no padding inside the stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SLMTOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQII32s")
assert HEADER.size == 64
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"


class DataError(ValueError):
    """Bad or damaged data on disk; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    n_tokens: int
    vocab_size: int
    itemsize: int
    tokenizer_sha256: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.itemsize == 2 else np.dtype(np.uint32)


def pack_header(n_tokens: int, vocab_size: int, tokenizer_sha256: str) -> bytes:
    itemsize = token_dtype(vocab_size).itemsize
    return HEADER.pack(MAGIC, VERSION, itemsize, n_tokens, vocab_size, 0, bytes.fromhex(tokenizer_sha256))


def read_header(path: Path) -> ShardHeader:
    """Parse and check a shard's header against its file size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER.size:
        raise DataError(f"{path}: too short to be a token shard ({len(raw)} bytes)")
    magic, version, itemsize, n_tokens, vocab_size, _, sha = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a token shard (bad magic {magic!r})")
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this code reads {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: bad token size {itemsize} in header")
    expected = HEADER.size + n_tokens * itemsize
    if size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header promises {n_tokens} tokens ({expected} bytes)")
    return ShardHeader(n_tokens, vocab_size, itemsize, sha.hex())


def open_tokens(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (nothing is read until used)."""
    header = read_header(path)
    if header.n_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER.size, shape=(header.n_tokens,))


class ShardWriter:
    """Append token arrays to `<path>.tmp`; `close()` writes the header and renames the file into place.

    A failed write (a full disk) removes the temporary file and raises a DataError naming the shard."""

    def __init__(self, path: Path, vocab_size: int, tokenizer_sha256: str) -> None:
        self.path, self.vocab_size, self.sha = path, vocab_size, tokenizer_sha256
        self.dtype = token_dtype(vocab_size)
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.n_tokens = 0
        with self._discarded_on_error():
            self.f.write(b"\0" * HEADER.size)

    def write(self, ids: np.ndarray) -> None:
        with self._discarded_on_error():
            self.f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += len(ids)

    def close(self) -> int:
        with self._discarded_on_error():
            self.f.seek(0)
            self.f.write(pack_header(self.n_tokens, self.vocab_size, self.sha))
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        return self.n_tokens

    def discard(self) -> None:
        """Close and remove the temporary file (the finished shards and any older `path` are left as they are)."""
        with contextlib.suppress(OSError):  # closing flushes the buffer, which fails again on a full disk
            self.f.close()
        self.tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _discarded_on_error(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            self.discard()
            raise write_error(self.path, e, self.tmp) from None


def write_error(path: Path, e: OSError, removed: Path) -> DataError:
    return DataError(
        f"{path}: {(e.strerror or str(e)).lower()}; removed the partial {removed.name}, nothing older was touched"
    )


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary name to write `path` under, renamed to `path` when the block completes. On a failure (a full disk)
    the temporary file is removed, an older `path` is left as it was, and a DataError names the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e, tmp) from None


def write_json_atomic(path: Path, obj: dict) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from None


def read_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; prepare the dataset with `python -m data.prepare`")
    manifest = read_json(path)
    try:
        manifest["splits"]["train"], manifest["tokenizer"]["sha256"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: damaged manifest ({e})") from None
    return manifest
