"""Generate text from a checkpoint (or a proxy-tuned combination) with KV-cache decoding.

    python -m tools.generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
        [--top-p P] [--seed S] [--json] [--expert DIR --anti-expert DIR --alpha A]

Temperature 0 is greedy. The prompt is encoded with BOS first, as in training.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from formats.checkpoint import CheckpointError
from model.sampling import generate
from tools.proxy import add_model_args, load_scorer


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be 0 or positive, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=probability)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help='print {"prompt_ids", "output_ids", "text"}')
    args = p.parse_args(argv)
    try:
        scorer = load_scorer(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    tok = scorer.tokenizer
    prompt_ids = tok.encode(args.prompt, bos=True)
    max_len = min(scorer.max_seq_len, len(prompt_ids) + args.max_new_tokens)
    if len(prompt_ids) >= max_len:
        sys.exit(f"error: prompt of {len(prompt_ids)} tokens leaves no room in a context of {scorer.max_seq_len}")
    prompt = torch.tensor([prompt_ids], device=args.device)
    out = generate(
        scorer.step(1, max_len),
        prompt,
        max_len - len(prompt_ids),
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        eos_id=tok.eos_id,
    )
    output_ids = out[0, len(prompt_ids) :].tolist()
    text = tok.decode(output_ids)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "output_ids": output_ids, "text": text}))
    else:
        print(args.prompt + text)


if __name__ == "__main__":
    main()
