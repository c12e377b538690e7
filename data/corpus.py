"""The embedded default corpus: the local Python standard library's source, prepared once into data_cache/."""

from __future__ import annotations

import sys
from pathlib import Path

from data.prepare import prepare
from data.shards import MANIFEST
from data.sources import stdlib_files
from data.tokenizer import file_sha256

CACHE_DIR = Path("data_cache")


def default_corpus(
    vocab_size: int, tokenizer: Path | None = None, cache_dir: Path = CACHE_DIR, progress: bool = True
) -> Path:
    """The prepared stdlib dataset for this Python version, with a BPE tokenizer of `vocab_size` trained on it, or
    with the given tokenizer (e.g. the one of a model training starts from); prepared now if missing."""
    tag = f"t{file_sha256(tokenizer)[:12]}" if tokenizer else f"v{vocab_size}"
    out = cache_dir / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{tag}"
    if not (out / MANIFEST).is_file():
        settings = {"tokenizer": tokenizer} if tokenizer else {"vocab_size": vocab_size}
        prepare(stdlib_files(), out, workers=2, val_fraction=0.02, shard_mb=8, progress=progress, **settings)
    return out
