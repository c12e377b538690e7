"""Loading the model(s) a tool scores or decodes with, including proxy-tuning (Liu et al., 2024).

Proxy-tuning steers a base model at decoding time with a small tuned model (the expert) and its untuned base (the
anti-expert): logits = base + alpha x (expert - anti_expert). No weight of the base model changes; the three models
only need to share a tokenizer, and may differ in size and in dense vs mixture of experts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from formats.checkpoint import CheckpointError, load_model, read_state, tokenizer_path
from model.llama import Transformer
from model.sampling import StepFn, model_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def proxy_logits(base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor, alpha: float) -> torch.Tensor:
    """base + alpha x (expert - anti), in fp32."""
    return base.float() + alpha * (expert.float() - anti.float())


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (the base model)")
    parser.add_argument("--expert", help="proxy-tuning: the tuned small model's checkpoint")
    parser.add_argument("--anti-expert", help="proxy-tuning: the untuned small model's checkpoint")
    parser.add_argument("--alpha", type=float, help="proxy-tuning strength (default 1.0)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")


@dataclass
class Scorer:
    """A model, or a proxy-tuned combination of three, with their shared tokenizer."""

    base: Transformer
    tokenizer: Tokenizer
    expert: Transformer | None = None
    anti: Transformer | None = None
    alpha: float = 1.0

    @property
    def device(self) -> torch.device:
        return self.base.lm_head.weight.device

    @property
    def max_seq_len(self) -> int:
        return min(m.cfg.max_seq_len for m in self.models)

    @property
    def models(self) -> list[Transformer]:
        return [m for m in (self.base, self.expert, self.anti) if m is not None]

    @torch.no_grad()
    def logits(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, vocab] (fp32)."""
        base = self.base(tokens_BT).logits
        if self.expert is None:
            return base.float()
        return proxy_logits(base, self.expert(tokens_BT).logits, self.anti(tokens_BT).logits, self.alpha)

    def step(self, batch: int, max_len: int) -> StepFn:
        """A decoding step over every model, each with its own KV cache."""
        steps = [model_step(m, batch, max_len) for m in self.models]
        if self.expert is None:
            return steps[0]
        return lambda tokens, start: proxy_logits(*(s(tokens, start) for s in steps), self.alpha)


def load_scorer(args: argparse.Namespace) -> Scorer:
    """The model(s) named by add_model_args' flags; a proxy's models must share one tokenizer and vocabulary.

    Tokenizers are checked before any model is loaded, so a mismatch fails at once, whatever the models' size.
    """
    if bool(args.expert) != bool(args.anti_expert):
        raise ValueError("proxy-tuning needs both --expert and --anti-expert")
    if args.alpha is not None and not args.expert:
        raise ValueError("--alpha steers proxy-tuning: give --expert and --anti-expert too")
    paths = [Path(p) for p in (args.checkpoint, args.expert, args.anti_expert) if p]
    tokenizers = [checkpoint_tokenizer(p) for p in paths]
    for path, tok in zip(paths[1:], tokenizers[1:]):
        if tok.sha256 != tokenizers[0].sha256:
            raise ValueError(
                f"{path}: tokenizer differs from {paths[0]}'s (checksum); proxy-tuning needs one vocabulary"
            )
    models = [load_model(p, args.device, DTYPES[args.dtype])[0] for p in paths]
    for path, model in zip(paths[1:], models[1:]):
        if model.cfg.vocab_size != models[0].cfg.vocab_size:
            raise ValueError(f"{path}: model.vocab_size {model.cfg.vocab_size} != {models[0].cfg.vocab_size}")
    scorer = Scorer(models[0], tokenizers[0], alpha=1.0 if args.alpha is None else args.alpha)
    if len(models) == 3:
        scorer.expert, scorer.anti = models[1], models[2]
    return scorer


def checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved with a checkpoint (read_state first, so a missing checkpoint is named as such)."""
    read_state(path)
    tok = tokenizer_path(path)
    if tok is None:
        raise CheckpointError(f"{path}: checkpoint has no tokenizer.model")
    return Tokenizer(tok)
