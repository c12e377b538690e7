"""Turn text files into token shards plus a manifest.

    python -m data.prepare --input PATH [PATH ...] --output DIR [--tokenizer FILE|DIR | --vocab-size N] [--workers N]

Input files are grouped (by size) into shards; each group is tokenized by one worker process into a `train-NNNNN.bin`
and a `val-NNNNN.bin` shard (a document goes to validation when a hash of its text falls under --val-fraction, so the
split does not depend on the grouping or the number of workers). Shards are written under a temporary name and
renamed when complete; re-running the same command skips the finished ones.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shards import (
    MANIFEST,
    TOKENIZER_FILE,
    DataError,
    ShardWriter,
    read_header,
    read_json,
    replaced_atomically,
    token_dtype,
    write_json_atomic,
)
from data.sources import find_input_files, read_documents
from data.tokenizer import Tokenizer, file_sha256, train_tokenizer

PLAN = "plan.json"
ENCODE_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class Group:
    index: int
    files: tuple[str, ...]
    nbytes: int

    def shard(self, output: Path, split: str) -> Path:
        return output / f"{split}-{self.index:05d}.bin"


def plan_groups(files: list[Path], shard_bytes: int) -> list[Group]:
    """Consecutive files whose sizes add up to about `shard_bytes` form one group (one shard per split)."""
    groups: list[Group] = []
    current: list[str] = []
    size = 0
    for f in files:
        current.append(str(f.resolve()))
        size += f.stat().st_size
        if size >= shard_bytes:
            groups.append(Group(len(groups), tuple(current), size))
            current, size = [], 0
    if current:
        groups.append(Group(len(groups), tuple(current), size))
    return groups


def is_validation(text: bytes, val_fraction: float) -> bool:
    return zlib.crc32(text) < val_fraction * 2**32


def tokenizer_file(path: Path) -> Path:
    """A sentencepiece model given directly, or the one inside a model directory (e.g. a Hugging Face Llama's)."""
    if not path.is_dir():
        return path
    if not (path / TOKENIZER_FILE).is_file():
        raise DataError(f"{path}: directory has no {TOKENIZER_FILE} (a sentencepiece model is needed)")
    return path / TOKENIZER_FILE


def resolve_tokenizer(output: Path, files: list[Path], tokenizer: Path | None, vocab_size: int | None) -> Tokenizer:
    """The dataset's own copy of the tokenizer: given by path, kept from an earlier run, or trained on a sample."""
    dest = output / TOKENIZER_FILE
    if tokenizer is not None:
        tokenizer = tokenizer_file(tokenizer)
        given = Tokenizer(tokenizer)
        if dest.exists() and file_sha256(dest) != given.sha256:
            raise DataError(f"{output}: already prepared with another tokenizer; use a new --output")
        if not dest.exists():
            with replaced_atomically(dest) as tmp:
                shutil.copyfile(tokenizer, tmp)
        return Tokenizer(dest)
    if dest.exists():
        tok = Tokenizer(dest)
        if vocab_size is not None and tok.vocab_size != vocab_size:
            raise DataError(f"{dest}: has vocab size {tok.vocab_size}, not --vocab-size {vocab_size}")
        return tok
    if vocab_size is None:
        raise DataError("give --tokenizer FILE or --vocab-size N to train one")
    sample = list(files)
    random.Random(0).shuffle(sample)
    return train_tokenizer((doc for f in sample for doc in read_documents(f)), vocab_size, dest)


def _group_done(group: Group, output: Path, tokenizer_sha: str) -> bool:
    for split in ("train", "val"):
        path = group.shard(output, split)
        try:
            if read_header(path).tokenizer_sha256 != tokenizer_sha:
                return False
        except DataError:
            return False
    return True


def _encode_group(args: tuple[Group, str, str, float]) -> tuple[int, int]:
    """Tokenize one group into its train and val shards (EOS after each document); returns (group index, bytes)."""
    group, output, tokenizer_path, val_fraction = args
    tok = Tokenizer(tokenizer_path)
    out = Path(output)
    writers = {s: ShardWriter(group.shard(out, s), tok.vocab_size, tok.sha256) for s in ("train", "val")}
    dtype = token_dtype(tok.vocab_size)
    pending: dict[str, list[str]] = {"train": [], "val": []}
    pending_chars = 0

    def flush() -> None:
        for split, texts in pending.items():
            if texts:
                docs = [np.asarray(ids + [tok.eos_id], dtype=dtype) for ids in tok.encode_batch(texts)]
                writers[split].write(np.concatenate(docs))
                texts.clear()

    try:
        for path in group.files:
            for doc in read_documents(Path(path)):
                pending["val" if is_validation(doc.encode("utf-8", "replace"), val_fraction) else "train"].append(doc)
                pending_chars += len(doc)
                if pending_chars >= ENCODE_BATCH_CHARS:
                    flush()
                    pending_chars = 0
        flush()
        for w in writers.values():
            w.close()
    except BaseException:  # no temporary shard outlives a failed group (a full disk, a damaged input, Ctrl-C)
        for w in writers.values():
            w.discard()
        raise
    return group.index, group.nbytes


def _check_plan(output: Path, plan: dict) -> None:
    path = output / PLAN
    if path.exists() and read_json(path) != plan:
        raise DataError(f"{output}: holds shards prepared from other inputs or settings; use a new --output")
    write_json_atomic(path, plan)


def prepare(
    inputs: list[str | Path],
    output: str | Path,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    workers: int = 1,
    val_fraction: float = 0.01,
    shard_mb: float = 64,
    progress: bool = True,
) -> dict:
    """Prepare a dataset directory and return its manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = find_input_files([Path(p) for p in inputs])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tok = resolve_tokenizer(output, files, Path(tokenizer) if tokenizer else None, vocab_size)
    groups = plan_groups(files, int(shard_mb * 2**20))
    plan = {"files": [list(g.files) for g in groups], "val_fraction": val_fraction, "tokenizer": tok.sha256}
    _check_plan(output, plan)

    todo = [g for g in groups if not _group_done(g, output, tok.sha256)]
    jobs = [(g, str(output), str(tok.path), val_fraction) for g in todo]
    bar = tqdm(total=sum(g.nbytes for g in todo), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        results = map(_encode_group, jobs)
        for _, nbytes in results:
            bar.update(nbytes)
    else:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for _, nbytes in pool.imap_unordered(_encode_group, jobs):
                bar.update(nbytes)
    bar.close()
    return write_manifest(output, groups, tok, val_fraction)


def write_manifest(output: Path, groups: list[Group], tok: Tokenizer, val_fraction: float) -> dict:
    splits = {}
    for split in ("train", "val"):
        paths = [g.shard(output, split) for g in groups]
        shards = [{"file": p.name, "tokens": read_header(p).n_tokens} for p in paths]
        splits[split] = [s for s in shards if s["tokens"]]
    if not splits["train"]:
        raise DataError(f"{output}: the inputs produced no training tokens")
    manifest = {
        "format": "slm-token-shards",
        "version": 1,
        "dtype": str(token_dtype(tok.vocab_size)),
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "val_fraction": val_fraction,
        "splits": splits,
        "tokens": {split: sum(s["tokens"] for s in shards) for split, shards in splits.items()},
    }
    write_json_atomic(output / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or folders of text, JSON lines or parquet")
    p.add_argument("--output", required=True, help="dataset directory (shards, manifest.json, tokenizer.model)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="a sentencepiece tokenizer.model, or a model directory holding one")
    tok.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size on a sample of the input")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--shard-mb", type=float, default=64, help="input megabytes per shard")
    args = p.parse_args(argv)
    try:
        manifest = prepare(
            args.input, args.output, args.tokenizer, args.vocab_size, args.workers, args.val_fraction, args.shard_mb
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. an --output that cannot be written
        sys.exit(f"error: {e.filename or args.output}: {e.strerror or e}")
    print(f"{args.output}: {manifest['tokens']['train']:,} train and {manifest['tokens']['val']:,} val tokens")


if __name__ == "__main__":
    main()
