"""Average the weights of compatible checkpoints (model soups, WARM, checkpoint averaging), or score the straight
line between two of them.

    python -m tools.average CKPT [CKPT ...] [--weights W [W ...]] --output DIR [--overwrite]
    python -m tools.average --interpolate A B --data DIR [--points 11] [--max-windows N] [--plot FILE.png]

The average is written by formats/average.py average_checkpoints: a weights-only checkpoint in the trainer's format
(its train_state.json says "weights_only": true and records the sources and their weights; the model config is the
first checkpoint's). tools/, tools.export and train.py --init_from read it; training cannot resume from it (it has
no optimizer state). The weights are normalised to sum to 1. The checkpoints must hold tensors of the same names and
shapes and the same tokenizer. The mean is taken in fp32, one checkpoint at a time: memory stays at about two
models, whatever their number.

--interpolate prints one JSON line {"t", "loss", "ppl"} for each of --points evenly spaced t in [0, 1], the held-out
loss of (1 - t) A + t B on the validation split of a prepared dataset, scored as tools.perplexity scores it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from data.shards import DataError
from data.tokenizer import Tokenizer
from formats.average import average_checkpoints, check_compatible, interpolated_models, shared_tokenizer
from formats.checkpoint import CheckpointError
from tools.perplexity import ALL_WINDOWS, dataset_batches, score
from tools.proxy import Scorer


@torch.no_grad()
def interpolation_losses(
    a: str | Path,
    b: str | Path,
    data: str | Path,
    points: int = 11,
    max_windows: int = ALL_WINDOWS,
    echo: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Held-out loss of (1 - t) A + t B at `points` evenly spaced t in [0, 1] (the endpoints are A and B exactly).

    `echo(record)` is called as each point is scored. Memory: three models (A, B and the point between them)."""
    if points < 2:
        raise ValueError(f"--points must be at least 2, got {points}")
    a, b = Path(a), Path(b)
    check_compatible([a, b])
    found = shared_tokenizer([a, b])
    if found is None:
        raise CheckpointError(f"{a}: checkpoint has no tokenizer.model (needed to check --data)")
    tokenizer = Tokenizer(found)
    results = []
    for t, point in interpolated_models(a, b, points):
        batches = dataset_batches(
            data, "val", tokenizer, point.cfg.max_seq_len, point.cfg.vocab_size, max_windows=max_windows
        )
        scored = score(Scorer(point, tokenizer), batches)
        results.append({"t": t, "loss": scored["loss"], "ppl": scored["ppl"]})
        if echo is not None:
            echo(results[-1])
    return results


def plot_interpolation(ax, results: list[dict], label_a: str = "A", label_b: str = "B") -> None:
    """Loss along the line from A (t = 0) to B (t = 1) on a matplotlib axes."""
    ax.plot([r["t"] for r in results], [r["loss"] for r in results], marker="o")
    ax.set_xlabel(f"t: (1 - t) {label_a} + t {label_b}")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"linear interpolation {label_a} -> {label_b}")
    ax.grid(alpha=0.3)


def save_interpolation_plot(results: list[dict], path: str | Path, label_a: str, label_b: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_interpolation(ax, results, label_a, label_b)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoint directories to average")
    p.add_argument("--weights", nargs="+", type=float, help="one mixing weight per checkpoint (normalised)")
    p.add_argument("--output", help="directory of the averaged checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="score the line between two checkpoints")
    p.add_argument("--points", type=int, default=11, help="points on the line, endpoints included")
    p.add_argument("--data", help="prepared dataset whose validation split is scored (--interpolate)")
    p.add_argument("--max-windows", type=int, default=ALL_WINDOWS, help="score at most this many windows")
    p.add_argument("--plot", default="interpolation.png", help="PNG file for the interpolation curve")
    args = p.parse_args(argv)
    try:
        if args.interpolate:
            if args.checkpoints or not args.data:
                raise ValueError("--interpolate A B takes no other checkpoints and needs --data")
            echo = lambda record: print(json.dumps(record), flush=True)
            results = interpolation_losses(*args.interpolate, args.data, args.points, args.max_windows, echo)
            save_interpolation_plot(results, args.plot, *(Path(c).name for c in args.interpolate))
            print(f"plot: {args.plot}", file=sys.stderr)
        else:
            if not args.checkpoints or not args.output:
                raise ValueError("give the checkpoints to average and --output (or --interpolate A B --data DIR)")
            state = average_checkpoints(args.checkpoints, args.output, args.weights, args.overwrite)
            print(f"{args.output}: average of {len(state['sources'])} checkpoint(s), weights {state['weights']}")
    except (DataError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
