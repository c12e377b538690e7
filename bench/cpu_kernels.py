"""What each CPU fast path (cpu_kernels/) is worth to the training step: every path on against all but that one.

    python -m bench.cpu_kernels --shape tiny|small|moe --precision bf16-true|32-true [--rounds 5]
        [--paths loss,norm,attention,moe] [--steps 20] [--warmup 5] [--threads 2]

Each round runs `python -m bench.step` once with every fast path, then once without each path in turn (model/'s
reference runs in its place), at bench.vs_peer's shapes (moe: tiny with 8 experts, top-2), so that the runs
compared share the machine's load. The table gives each path's median tokens/s with and without it, the gain of the
medians and the lowest and highest gain of a round: a path earns its place when its gain stands clear of that
spread. The machine's matmul peaks, measured before and after the runs, come first. `--paths` defaults to those
that change this step.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

import bench.step
import training.setup
from bench.tables import markdown_table
from bench.vs_peer import SHAPES, run_json, step_flags
from cpu_kernels import FAST_PATHS, apply_cpu_kernels

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_main(paths: list[str]) -> None:
    """`python -m bench.step` with only `paths` swapped in: the child process of one run."""
    # bench.step builds its model by training.setup.build_model, which swaps in what this name holds: no config key
    # for a measurement-only choice.
    training.setup.apply_cpu_kernels = functools.partial(apply_cpu_kernels, paths=paths)
    bench.step.main()


def tokens_per_s(paths: list[str], flags: list[str]) -> float:
    code = f"from bench.cpu_kernels import step_main; step_main({paths!r})"
    return run_json(["-c", code, *flags])["tokens_per_s"]


def default_paths(moe: bool, precision: str) -> list[str]:
    """The paths that change this step: the matmul attention runs in bf16 only, the MoE path needs experts."""
    skip = {"attention"} if precision == "32-true" else set()
    return [p for p in FAST_PATHS if p not in skip and (moe or p != "moe")]


def matmul_peaks(threads: int) -> str:
    torch.set_num_threads(threads)
    peaks = {name: bench.step.matmul_peak_flops(dtype) / 1e9 for name, dtype in PEAK_DTYPES.items()}
    return ", ".join(f"{name} {gflops:.0f}" for name, gflops in peaks.items())


def alternate(paths: list[str], flags: list[str], rounds: int) -> tuple[list[float], dict[str, list[float]]]:
    """tokens/s of each round's run with every path, and of its runs without each of `paths`."""
    with_all: list[float] = []
    without: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        with_all.append(tokens_per_s(list(FAST_PATHS), flags))
        for path in paths:
            without[path].append(tokens_per_s([p for p in FAST_PATHS if p != path], flags))
    return with_all, without


def gain_row(path: str, with_all: list[float], without: list[float]) -> dict:
    gains = [100 * (a / b - 1) for a, b in zip(with_all, without)]
    return {
        "path": path,
        "tokens/s with": statistics.median(with_all),
        "tokens/s without": statistics.median(without),
        "gain %": f"{100 * (statistics.median(with_all) / statistics.median(without) - 1):+.1f}",
        "gain % per round, min to max": f"{min(gains):+.1f} to {max(gains):+.1f}",
        "each run without": ", ".join(f"{t:.0f}" for t in without),
    }


def parse_paths(text: str) -> list[str]:
    paths = text.split(",")
    if not set(paths) <= set(FAST_PATHS):
        raise argparse.ArgumentTypeError(f"paths are among {','.join(FAST_PATHS)}, got {text}")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=[*SHAPES, "moe"], default="tiny")
    p.add_argument("--precision", choices=["bf16-true", "32-true"], default="bf16-true")
    p.add_argument("--paths", type=parse_paths, help="comma-separated, among " + ",".join(FAST_PATHS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    moe = args.shape == "moe"
    shape = SHAPES["tiny" if moe else args.shape]
    flags = step_flags(shape, args.precision, moe, args.threads, args.steps, args.warmup)
    paths = args.paths or default_paths(moe, args.precision)
    peaks_before = matmul_peaks(args.threads)
    with_all, without = alternate(paths, flags, args.rounds)
    print(
        f"matmul peak, 2048 x 2048, {args.threads} threads (GFLOP/s): before the runs {peaks_before}; after them "
        f"{matmul_peaks(args.threads)}"
    )
    print(f"{args.shape}, {args.precision}, {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up")
    print("each run with every path: " + ", ".join(f"{t:.0f}" for t in with_all))
    print(markdown_table([gain_row(path, with_all, runs) for path, runs in without.items()]))


if __name__ == "__main__":
    main()
