"""Input text: find the files under the given paths and read their documents."""

from __future__ import annotations

import gzip
import io
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data.shards import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py")  # one document per file
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")  # one document per line, field "text"
PARQUET_SUFFIXES = (".parquet",)  # one document per row, column "text"
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def find_input_files(paths: list[str | Path]) -> list[Path]:
    """Every supported file named or found under a named folder, sorted; a missing or empty input is an error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if not _supported(path):
                raise ValueError(f"{path}: unsupported input type (expected one of {', '.join(SUFFIXES)})")
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
            if not found:
                raise ValueError(f"{path}: no input files ({', '.join(SUFFIXES)}) in this folder")
            files.extend(found)
        else:
            raise ValueError(f"{path}: input path does not exist")
    return sorted(set(files))


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
            if text:
                yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: parquet file has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one input file; a damaged file (truncated gzip, bad parquet, ...) is a DataError naming it."""
    try:
        yield from _documents(path)
    except DataError:
        raise
    except (OSError, EOFError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot read ({e})") from None


def _documents(path: Path) -> Iterator[str]:
    if path.name.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path)
    elif path.name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path)
    else:
        with _open_text(path) as f:
            text = f.read()
        if text:
            yield text


def stdlib_files(packages: list[str] | None = None, exclude: list[str] | None = None) -> list[Path]:
    """The embedded default corpus: the local Python standard library's source files (no download needed).

    `packages` keeps only those top-level packages (e.g. ["email"]); `exclude` drops them.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        top = rel[0] if len(rel) > 1 else ""
        if "site-packages" in rel or (packages and top not in packages) or (exclude and top in exclude):
            continue
        files.append(p)
    return files
