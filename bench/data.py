"""Data-path throughput: data.prepare's tokenizing against sentencepiece alone, and the training loader against what
a training step consumes. One JSON line per measurement, then a markdown table.

    python -m bench.data [--packages email json ...] [--vocab-size 8192 | --tokenizer FILE] [--workers 1 2]

The corpus is the local Python standard library (data.sources.stdlib_files; --packages keeps only those packages).
The tokenizer is trained first, on its own row, unless --tokenizer is given, so the prepare rows only tokenize:
  prepare        data.prepare.prepare with N worker processes into a fresh directory, the input grouped by --shard-mb
                 so that several groups run in parallel: MB/s of input text and tokens/s, file reading and shard
                 writing included.
  sentencepiece  SentencePieceProcessor.encode on the whole list of documents (already read), 1 and 2 threads.
  step           what training consumes: bench.step's tokens/s with --bench-args on this machine, and at the 1.1B
                 shapes the bound of one H200 at 100% MFU (its bf16 peak over the training FLOPs per token).
  loader         data.stream.train_loader (0 and 1 worker processes) on the prepared data at the tiny shapes
                 (8 x 256) and the 1.1B shapes (8 x 2048), for --loader-seconds each. `headroom` is its tokens/s over
                 the step it feeds; per rank, as every rank has its own loader.
Token counts include the EOS after each document, as in the shards.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.tables import markdown_table
from data.prepare import plan_groups, prepare, resolve_tokenizer
from data.sources import read_documents, stdlib_files
from data.tokenizer import Tokenizer

# torch is imported only inside the functions that need it: prepare's worker processes are spawned, re-import this
# module, and would otherwise pay torch's import time inside the measured prepare runs.

REPO = Path(__file__).resolve().parent.parent
LOADER_SHAPES = {"tiny": (256, 8), "1.1B": (2048, 8)}  # (seq_len, micro-batch), as in configs/
COLUMNS = ["stage", "what", "seconds", "input MB/s", "tokens/s", "headroom", "note"]
MB = 2**20


def emit(records: list[dict], record: dict) -> dict:
    print(json.dumps(record), flush=True)
    records.append(record)
    return record


def time_tokenizer_training(files: list[Path], vocab_size: int, out: Path) -> tuple[dict, Tokenizer]:
    """Train the tokenizer exactly as data.prepare does when given --vocab-size."""
    t0 = time.perf_counter()
    tok = resolve_tokenizer(out, files, None, vocab_size)
    seconds = time.perf_counter() - t0
    record = {"stage": "tokenizer", "what": f"train BPE, vocab {vocab_size}", "seconds": seconds}
    return record, tok


def time_prepare(files: list[Path], tokenizer: Path, out: Path, workers: int, shard_mb: float) -> dict:
    n_groups = len(plan_groups(files, int(shard_mb * MB)))
    input_mb = sum(f.stat().st_size for f in files) / MB
    t0 = time.perf_counter()
    manifest = prepare(files, out, tokenizer=tokenizer, workers=workers, shard_mb=shard_mb, progress=False)
    seconds = time.perf_counter() - t0
    tokens = manifest["tokens"]["train"] + manifest["tokens"]["val"]
    return {
        "stage": "prepare",
        "what": f"data.prepare, {workers} worker{'s' if workers > 1 else ''}",
        "seconds": seconds,
        "input MB/s": input_mb / seconds,
        "tokens/s": tokens / seconds,
        "tokens": tokens,
        "note": f"{n_groups} groups of ~{shard_mb:g} MB",
    }


def time_sentencepiece(tok: Tokenizer, docs: list[str], threads: int, prepared_tokens: int) -> dict:
    input_mb = sum(len(d.encode("utf-8", "replace")) for d in docs) / MB
    t0 = time.perf_counter()
    ids = tok.sp.encode(docs, num_threads=threads)
    seconds = time.perf_counter() - t0
    tokens = sum(len(x) for x in ids) + len(docs)  # + one EOS per document, as prepare counts them
    same = "same tokens as prepare" if tokens == prepared_tokens else f"prepare wrote {prepared_tokens:,} tokens"
    return {
        "stage": "sentencepiece",
        "what": f"SentencePieceProcessor.encode, {threads} thread{'s' if threads > 1 else ''}",
        "seconds": seconds,
        "input MB/s": input_mb / seconds,
        "tokens/s": tokens / seconds,
        "tokens": tokens,
        "note": f"documents in memory; {same}",
    }


def time_training_step(bench_args: str) -> dict:
    """bench.step in a subprocess (it sets up Fabric and a process group of its own)."""
    args = [sys.executable, "-m", "bench.step", *shlex.split(bench_args)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[1:])} failed:\n{proc.stderr[-2000:]}")
    bench = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "stage": "step",
        "what": f"training step on {bench['device']}: bench.step {bench_args}",
        "tokens/s": bench["tokens_per_s"],
        "note": f"{bench['batch_size']} x {bench['seq_len']}, {bench['params_total'] / 1e6:.1f}M params, "
        f"{bench['precision']}, {bench['steps']} steps",
    }


def gpu_step_bound() -> dict:
    from model.config import flops_per_token
    from training.config import model_preset
    from training.metrics import GPU_BF16_PEAK

    seq_len = LOADER_SHAPES["1.1B"][0]
    per_token = flops_per_token(model_preset("tinyllama-1.1b"), seq_len)
    peak = GPU_BF16_PEAK["NVIDIA H200"]
    return {
        "stage": "step",
        "what": "training step, tinyllama-1.1b on one H200 at 100% MFU",
        "tokens/s": peak / per_token,
        "note": f"upper bound: {peak / 1e12:.0f} TFLOP/s / {per_token / 1e9:.2f} GFLOP per token",
    }


def time_loader(dataset: Path, vocab_size: int, shape: str, workers: int, seconds: float, step: dict) -> dict:
    """Batches drawn from train_loader for `seconds`, after the first (which pays for starting the workers)."""
    from data.stream import DataState, open_streams, train_loader

    seq_len, micro = LOADER_SHAPES[shape]
    streams = open_streams([dataset], "train", vocab_size, seq_len)
    loader = train_loader(streams, [1.0], DataState(seed=0), seq_len, vocab_size, micro, micro, 0, 1, workers)
    batches = iter(loader)
    next(batches)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        next(batches)
        n += 1
    elapsed = time.perf_counter() - t0
    tokens_per_s = n * micro * (seq_len + 1) / elapsed
    return {
        "stage": "loader",
        "what": f"train_loader, {shape} shapes {micro} x {seq_len}, {workers} worker{'s' if workers != 1 else ''}",
        "seconds": elapsed,
        "tokens/s": tokens_per_s,
        "headroom": tokens_per_s / step["tokens/s"],
        "note": f"{n} batches; vs {step['what']}",
    }


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    files = stdlib_files(args.packages)
    records: list[dict] = []
    if args.tokenizer:
        tok = Tokenizer(args.tokenizer)
    else:
        record, tok = time_tokenizer_training(files, args.vocab_size, work / "tokenizer")
        emit(records, record)
    prepared = [
        emit(records, time_prepare(files, tok.path, work / f"prepared-{w}", w, args.shard_mb)) for w in args.workers
    ]
    docs = [doc for f in files for doc in read_documents(f)]
    for threads in (1, 2):
        emit(records, time_sentencepiece(tok, docs, threads, prepared[0]["tokens"]))
    steps = {
        "tiny": emit(records, time_training_step(args.bench_args)),
        "1.1B": emit(records, gpu_step_bound()),
    }
    dataset = work / f"prepared-{args.workers[-1]}"
    for shape, step in steps.items():
        for workers in (0, 1):
            emit(records, time_loader(dataset, tok.vocab_size, shape, workers, args.loader_seconds, step))
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--packages", nargs="+", help="only these top-level stdlib packages (default: all of it)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="an existing sentencepiece model: skips training one")
    tok.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained first")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data.prepare worker counts to time")
    p.add_argument("--shard-mb", type=float, default=4, help="input MB per prepare group (several groups: parallel)")
    p.add_argument(
        "--bench-args",
        default="--config=configs/tiny.yaml --steps=2 --warmup=1",
        help="bench.step's flags for the training step that the tiny-shape loader feeds",
    )
    p.add_argument("--loader-seconds", type=float, default=2.0, help="time spent drawing batches per loader row")
    p.add_argument("--work", help="directory for the tokenizer and prepared shards (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        records = run(args, Path(args.work or tmp))
    print(markdown_table(records, COLUMNS), flush=True)


if __name__ == "__main__":
    main()
