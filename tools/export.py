"""Export a training checkpoint as a Hugging Face model directory (Llama for dense, Mixtral for MoE).

    python -m tools.export --checkpoint runs/tiny/checkpoints/step-00000300 --output hf/tiny
        [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]

The command line over formats/export.py export, which says what the directory holds.
"""

from __future__ import annotations

import argparse
import re
import sys

from formats.checkpoint import CheckpointError
from formats.export import DTYPES, export

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as Hugging Face's


def shard_size(text: str) -> int:
    """--max-shard-size: a positive number of bytes, e.g. 500MB, 2GB or 1000000."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?B)?", text.strip(), re.IGNORECASE)
    size = int(float(found.group(1)) * SIZE_UNITS[(found.group(2) or "").upper()]) if found else 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 2GB or 500MB, got {text!r}")
    return size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint directory (step-NNNNNNNN)")
    p.add_argument("--output", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype of the export")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB", help="largest safetensors file, e.g. 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    args = p.parse_args(argv)
    try:
        files = export(args.checkpoint, args.output, DTYPES[args.dtype], args.max_shard_size, args.overwrite)
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))
    print(f"{args.output}: {args.dtype} weights in {len(files)} safetensors file(s)")


if __name__ == "__main__":
    main()
