"""Held-out loss, perplexity and bits per byte of a checkpoint (or of a proxy-tuned combination); one JSON line.

    python -m tools.perplexity --checkpoint DIR (--data DIR | --text-file FILE) [--expert DIR --anti-expert DIR]
    python -m tools.perplexity --checkpoint HF_DIR --transformers (--data DIR | --text-file FILE)

--transformers loads --checkpoint, a Hugging Face directory (tools.export's output), into transformers and scores
it there with its tokenizer.model: the same text's loss as the checkpoint it was exported from is export parity.

--data scores the validation split of a prepared dataset in windows of the model's context (--seq-len to change);
--text-file scores the tokenizer's encoding of the file with BOS first. loss is the mean next-token cross-entropy
in nats per token, ppl = exp(loss), bpb = loss x tokens / bytes / ln 2 in bits per UTF-8 byte of the scored text
(data.tokenizer.TextBytes: for --text-file, the file's size), which compares across tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.shards import DataError
from data.stream import TokenStream, val_batches
from data.tokenizer import TextBytes, Tokenizer
from formats.checkpoint import CheckpointError
from tools.proxy import DTYPES, Scorer, add_model_args, load_scorer

BATCH_SIZE = 4
ALL_WINDOWS = 1 << 30


def text_windows(ids: list[int], window: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of up to `window` positions each, covering every next-token prediction of `ids` once."""
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1])
        yield chunk[None, :-1], chunk[None, 1:]


@dataclass
class TransformersScorer:
    """A Hugging Face model directory run by transformers, with the sentencepiece tokenizer.model beside it."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    max_seq_len: int
    vocab_size: int
    device = torch.device("cpu")

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype) -> TransformersScorer:
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (config.json, tokenizer.model)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        cfg = model.config
        return cls(model, Tokenizer(path / "tokenizer.model"), cfg.max_position_embeddings, cfg.vocab_size)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).logits.float()


def dataset_batches(
    data: str | Path,
    split: str,
    tokenizer: Tokenizer,
    seq_len: int,
    vocab_size: int,
    batch_size: int = BATCH_SIZE,
    max_windows: int = ALL_WINDOWS,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) over the first `max_windows` windows of a prepared split, which must have been prepared
    with `tokenizer`."""
    stream = TokenStream(data, split)
    if stream.tokenizer["sha256"] != tokenizer.sha256:
        raise DataError(f"{data}: prepared with another tokenizer than the checkpoint's ({tokenizer.path})")
    return val_batches(stream, seq_len, vocab_size, batch_size, 0, 1, max_windows)


def score(scorer: Scorer, batches) -> dict:
    """Mean next-token loss and bits per byte over (inputs, targets) batches; targets of -100 are not scored.

    `scorer` is anything with a `device`, a `tokenizer` and `logits(tokens_BT)` (a Scorer, or an ensemble)."""
    total, tokens, n_bytes = 0.0, 0, 0
    text_bytes = TextBytes(scorer.tokenizer)
    device = scorer.device
    for inputs, targets in batches:
        logits = scorer.logits(inputs.to(device))
        total += F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
        tokens += int((targets != -100).sum())
        n_bytes += int(text_bytes.count(inputs, targets))
    loss = total / max(tokens, 1)
    bpb = total / max(n_bytes, 1) / math.log(2)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bpb, "tokens": tokens, "bytes": n_bytes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a prepared dataset directory (its validation split is scored)")
    source.add_argument("--text-file", help="a text file to score")
    p.add_argument("--split", default="val", help="dataset split to score (with --data)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    p.add_argument("--max-windows", type=int, default=ALL_WINDOWS, help="score at most this many windows (--data)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--transformers", action="store_true", help="--checkpoint is a Hugging Face dir: run transformers")
    args = p.parse_args(argv)
    try:
        if args.transformers:
            if args.expert or args.anti_expert:
                raise ValueError("--transformers scores one model: drop --expert and --anti-expert")
            scorer = TransformersScorer.load(args.checkpoint, DTYPES[args.dtype])
            vocab = scorer.vocab_size
        else:
            scorer = load_scorer(args)
            vocab = scorer.base.cfg.vocab_size
        seq_len = args.seq_len or scorer.max_seq_len
        if args.data:
            batches = dataset_batches(
                args.data, args.split, scorer.tokenizer, seq_len, vocab, args.batch_size, args.max_windows
            )
        else:
            path = Path(args.text_file)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: text file not found")
            ids = scorer.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), bos=True)
            if len(ids) < 2:  # BOS alone predicts nothing
                raise DataError(f"no tokens to score in {path}")
            batches = text_windows(ids, seq_len)
        print(json.dumps(score(scorer, batches)))
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
