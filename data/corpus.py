"""The embedded default corpus: the local Python standard library's source, prepared once into data_cache/."""

from __future__ import annotations

import sys
from pathlib import Path

from data.prepare import prepare
from data.shards import MANIFEST
from data.sources import stdlib_files

CACHE_DIR = Path("data_cache")


def default_corpus(vocab_size: int, cache_dir: Path = CACHE_DIR, progress: bool = True) -> Path:
    """The prepared stdlib dataset for this Python version and vocabulary size (prepared now if missing)."""
    out = cache_dir / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    if not (out / MANIFEST).is_file():
        prepare(stdlib_files(), out, vocab_size=vocab_size, workers=2, val_fraction=0.02, shard_mb=8, progress=progress)
    return out
