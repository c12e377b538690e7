"""Training speed and memory against a peer trainer on the same shapes, alternating runs in one session.

    python -m bench.vs_peer --peer ../shared/peers/hf_train.py --shape tiny --precision bf16-true [--rounds 3]
        [--moe] [any bench.step flag, e.g. --compile true]

The peer is transformers' LlamaForCausalLM (MixtralForCausalLM with --moe) trained by the peer script with the same
layers, widths, vocabulary, sequence length, batch, dtype and threads; ours is `python -m bench.step` with one
optimizer step per batch. Runs alternate (ours, peer, ours, ...) so that both see the same machine load; the table
gives each side's median tokens/s and peak RSS over the rounds, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench.tables import markdown_table

SHAPES = {  # layers, dim, heads, kv heads, ffn, vocab, seq, batch
    "tiny": (4, 256, 8, 2, 688, 8192, 256, 8),
    "small": (8, 512, 8, 2, 1376, 32000, 512, 4),
}
PEER_DTYPE = {"32-true": "fp32", "bf16-true": "bf16", "bf16-mixed": "bf16-mixed"}


def step_flags(shape: tuple, precision: str, moe: bool, threads: int, steps: int, warmup: int) -> list[str]:
    """bench.step's flags for these shapes (also bench/cpu_kernels.py's), with AdamW as the peer trains (the
    configs may choose another optimizer)."""
    layers, dim, heads, kv, ffn, vocab, seq, batch = shape
    config = "configs/tiny-moe.yaml" if moe else "configs/tiny.yaml"
    return [
        f"--config={config}", f"--model.n_layers={layers}", f"--model.dim={dim}",
        f"--model.n_heads={heads}", f"--model.n_kv_heads={kv}", f"--model.ffn_dim={ffn}", f"--model.vocab_size={vocab}",
        f"--model.max_seq_len={seq}", f"--seq_len={seq}", f"--micro_batch_size={batch}", f"--global_batch_size={batch}",
        f"--precision={precision}", f"--threads={threads}", f"--steps={steps}", f"--warmup={warmup}",
        "--optim.name=adamw",
    ]  # fmt: skip


def peer_args(peer: str, shape: tuple, precision: str, moe: bool, threads: int, steps: int, warmup: int) -> list[str]:
    layers, dim, heads, kv, ffn, vocab, seq, batch = shape
    args = [
        peer, f"--layers={layers}", f"--dim={dim}", f"--heads={heads}", f"--kv-heads={kv}", f"--ffn={ffn}",
        f"--vocab={vocab}", f"--seq={seq}", f"--batch={batch}", f"--steps={steps + warmup}", f"--warmup={warmup}",
        f"--dtype={PEER_DTYPE[precision]}", f"--threads={threads}",
    ]  # fmt: skip
    return args + ["--experts=8", "--topk=2"] if moe else args


def run_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: python {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True, help="the peer trainer script (e.g. ../shared/peers/hf_train.py)")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--precision", choices=list(PEER_DTYPE), default="bf16-true")
    p.add_argument("--moe", action="store_true", help="8 experts, top-2, in every layer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    args, extra = p.parse_known_args(argv)
    shape = SHAPES[args.shape]
    ours = ["-m", "bench.step", *step_flags(shape, args.precision, args.moe, args.threads, args.steps, args.warmup)]
    ours += extra
    peer = peer_args(args.peer, shape, args.precision, args.moe, args.threads, args.steps, args.warmup)
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for _ in range(args.rounds):
        runs["ours"].append(run_json(ours))
        runs["peer"].append(run_json(peer))
    median = {side: statistics.median(r["tokens_per_s"] for r in records) for side, records in runs.items()}
    rows = [
        {
            "trainer": side,
            "tokens/s (median)": med,
            "each run": ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs[side]),
            "peak RSS MB (median)": statistics.median(r["peak_rss_mb"] for r in runs[side]),
        }
        for side, med in median.items()
    ]
    label = f"{args.shape}{' MoE' if args.moe else ''}, {args.precision}{' ' + ' '.join(extra) if extra else ''}"
    print(f"{label}: ours / peer = {median['ours'] / median['peer']:.2f}x")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
