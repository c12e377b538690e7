"""Shards -> training batches, in an order that is a pure function of (seed, position).

A prepared dataset's token stream is cut into windows of seq_len + 1 tokens. Each epoch visits its windows in a
pseudo-random order given by a keyed bijection of the window indices (no permutation array is stored, so this works
for any corpus size). A mixture of datasets fills every global batch with a fixed quota from each dataset. The
whole state of the data order is a `DataState` (seed, samples consumed, samples consumed per dataset): the same on
every rank and independent of the number of ranks, so resuming is arithmetic, never a replay of batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.shards import DataError, open_tokens, read_header, read_manifest

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class TokenStream:
    """One split of one prepared dataset as a single memory-mapped token stream."""

    def __init__(self, dataset_dir: str | Path, split: str) -> None:
        self.dir = Path(dataset_dir)
        manifest = read_manifest(self.dir)
        self.tokenizer = manifest["tokenizer"]
        entries = manifest["splits"].get(split, [])
        self.files = [self.dir / e["file"] for e in entries]
        for path, entry in zip(self.files, entries):
            header = read_header(path)
            if header.n_tokens != entry["tokens"] or header.tokenizer_sha256 != self.tokenizer["sha256"]:
                raise DataError(f"{path}: shard does not match {self.dir / 'manifest.json'}")
        self.shards = [open_tokens(p) for p in self.files]
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries."""
        parts, pos, end = [], start, start + length
        i = int(np.searchsorted(self.ends, pos, side="right"))
        while pos < end:
            shard_start = int(self.ends[i - 1]) if i else 0
            take = min(end, int(self.ends[i])) - pos
            parts.append(self.shards[i][pos - shard_start : pos - shard_start + take])
            pos += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def shard_of(self, position: int) -> Path:
        return self.files[int(np.searchsorted(self.ends, position, side="right"))]

    def n_windows(self, seq_len: int) -> int:
        return max(0, (len(self) - 1) // seq_len)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing hash of 64-bit integers."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowOrder:
    """A keyed pseudo-random bijection of [0, n): a 4-round Feistel network with cycle walking.

    order(i) is computed directly for any i, so an epoch's order costs no memory and any position is reachable
    in O(1). Keys come from numpy's PCG64 seeded with (seed, dataset, epoch).
    """

    def __init__(self, n: int, seed: int, dataset: int, epoch: int) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.Generator(np.random.PCG64([seed, dataset, epoch]))
        self.keys = rng.integers(0, 2**63, size=4, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = self._feistel(np.asarray(index, dtype=np.uint64))
            outside = x >= self.n
            while outside.any():  # walk the cycle until it re-enters [0, n): still a bijection of [0, n)
                x[outside] = self._feistel(x[outside])
                outside = x >= self.n
        return x.astype(np.int64)


def batch_quotas(weights: list[float], global_batch: int) -> list[int]:
    """How many samples of each dataset go into every global batch (largest-remainder rounding)."""
    total = sum(weights)
    exact = [w / total * global_batch for w in weights]
    quotas = [int(q) for q in exact]
    by_remainder = sorted(range(len(weights)), key=lambda d: exact[d] - quotas[d], reverse=True)
    for d in by_remainder[: global_batch - sum(quotas)]:
        quotas[d] += 1
    return quotas


@dataclass
class DataState:
    """Position in the global data order; identical on every rank."""

    seed: int
    samples: int = 0
    per_dataset: list[int] = field(default_factory=lambda: [0])

    def advance(self, quotas: list[int]) -> None:
        self.samples += sum(quotas)
        self.per_dataset = [c + q for c, q in zip(self.per_dataset, quotas)]

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.samples, self.per_dataset = state["seed"], state["samples"], list(state["per_dataset"])


def global_batch(state: DataState, quotas: list[int], n_windows: list[int]) -> list[tuple[int, int]]:
    """The (dataset, window) pairs of the global batch that starts at `state`, in slot order."""
    slots_dataset = np.repeat(np.arange(len(quotas)), quotas)
    np.random.Generator(np.random.PCG64([state.seed, state.samples])).shuffle(slots_dataset)
    batch: list[tuple[int, int] | None] = [None] * len(slots_dataset)
    for d, quota in enumerate(quotas):
        if not quota:
            continue
        positions = state.per_dataset[d] + np.arange(quota)
        epochs = positions // n_windows[d]
        windows = np.empty(quota, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            windows[sel] = WindowOrder(n_windows[d], state.seed, d, int(epoch))(positions[sel] % n_windows[d])
        for slot, w in zip(np.flatnonzero(slots_dataset == d), windows):
            batch[slot] = (d, int(w))
    return batch  # type: ignore[return-value]


class RankBatches:
    """Batch sampler: this rank's micro-batches, optimizer step after optimizer step, from a starting state.

    Global batch -> micro-step m -> rank r: slots [(m * world + r) * micro, ... + micro).
    """

    def __init__(self, state: DataState, quotas: list[int], n_windows: list[int], micro: int, rank: int, world: int):
        self.state, self.quotas, self.n_windows = copy.deepcopy(state), quotas, n_windows
        self.micro, self.rank, self.world = micro, rank, world
        self.accum = sum(quotas) // (micro * world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        state = copy.deepcopy(self.state)
        while True:
            batch = global_batch(state, self.quotas, self.n_windows)
            for m in range(self.accum):
                start = (m * self.world + self.rank) * self.micro
                yield batch[start : start + self.micro]
            state.advance(self.quotas)


class Windows(Dataset):
    """(dataset, window) -> int64 tokens [seq_len + 1], checked against the model's vocabulary."""

    def __init__(self, streams: list[TokenStream], seq_len: int, vocab_size: int) -> None:
        self.streams, self.seq_len, self.vocab_size = streams, seq_len, vocab_size

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        d, w = key
        stream = self.streams[d]
        tokens = stream.read(w * self.seq_len, self.seq_len + 1)
        if tokens.max() >= self.vocab_size:
            bad = int(np.argmax(tokens >= self.vocab_size))
            path = stream.shard_of(w * self.seq_len + bad)
            raise DataError(f"{path}: token id {int(tokens[bad])} is >= model.vocab_size {self.vocab_size}")
        return torch.from_numpy(tokens.astype(np.int64))


def open_streams(paths: list[str | Path], split: str, vocab_size: int, seq_len: int) -> list[TokenStream]:
    """Open one split of each dataset; they must share a tokenizer that fits the model's vocabulary."""
    streams = [TokenStream(p, split) for p in paths]
    for s in streams:
        if s.tokenizer["sha256"] != streams[0].tokenizer["sha256"]:
            raise DataError(f"{s.dir}: tokenizer differs from {streams[0].dir}'s; a mixture needs one tokenizer")
        if s.tokenizer["vocab_size"] > vocab_size:
            raise DataError(
                f"{s.dir}: tokenizer has {s.tokenizer['vocab_size']} tokens but model.vocab_size is {vocab_size}"
            )
        if s.n_windows(seq_len) == 0:
            raise DataError(f"{s.dir}: {split} split has {len(s)} tokens, fewer than one window of {seq_len + 1}")
    return streams


def train_loader(
    streams: list[TokenStream],
    weights: list[float],
    state: DataState,
    seq_len: int,
    vocab_size: int,
    global_batch_size: int,
    micro_batch: int,
    rank: int,
    world: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of this rank's micro-batches [micro_batch, seq_len + 1], starting at `state`.

    `pin_memory` (set it when training on CUDA) returns page-locked batches, so that the host-to-device copy with
    non_blocking=True is really asynchronous; from pageable memory it blocks the host."""
    quotas = batch_quotas(weights, global_batch_size)
    sampler = RankBatches(state, quotas, [s.n_windows(seq_len) for s in streams], micro_batch, rank, world)
    return DataLoader(
        Windows(streams, seq_len, vocab_size),
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )


def val_batches(
    stream: TokenStream, seq_len: int, vocab_size: int, micro_batch: int, rank: int, world: int, n_windows: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) micro-batches over the first `n_windows` windows of a split, in order, this rank's share.

    The windows are the same for every world size (rank r takes r, r + world, ...). Every rank runs the same
    number of batches, as sharded models need: rows beyond a rank's share are padding with targets -100.
    """
    n_windows = min(n_windows, stream.n_windows(seq_len))
    if n_windows == 0:
        raise DataError(f"{stream.dir}: split too small for one window of {seq_len + 1} tokens")
    windows = Windows([stream], seq_len, vocab_size)
    per_rank = -(-n_windows // world)
    mine = [rank + world * i for i in range(per_rank)]
    for start in range(0, per_rank, micro_batch):
        ids = mine[start : start + micro_batch]
        batch = torch.stack([windows[(0, w if w < n_windows else 0)] for w in ids])
        targets = batch[:, 1:].clone()
        targets[torch.tensor([w >= n_windows for w in ids])] = -100
        yield batch[:, :-1], targets
