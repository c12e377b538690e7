"""Decoding with a KV cache: temperature, top-k and top-p sampling; temperature 0 is greedy."""

from __future__ import annotations

from collections.abc import Callable

import torch

# next-token logits [B, vocab] from (new tokens [B, T], their start position)
StepFn = Callable[[torch.Tensor, int], torch.Tensor]


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """One token id per row of logits, [B, 1]."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix reaching top_p
        logits_BV = logits_BV.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits_BV.device)


def model_step(model: torch.nn.Module, batch: int, max_len: int) -> StepFn:
    """A StepFn over one model with its own KV cache."""
    cache = model.new_cache(batch, max_len) if hasattr(model, "new_cache") else None

    def step(tokens_BT: torch.Tensor, start: int) -> torch.Tensor:
        return model(tokens_BT, cache=cache, start=start).logits[:, -1]

    return step


def no_cache_step(model: torch.nn.Module) -> StepFn:
    """A StepFn that re-reads the whole sequence every step (the reference the cache must reproduce)."""
    seen: list[torch.Tensor] = []

    def step(tokens_BT: torch.Tensor, start: int) -> torch.Tensor:
        seen.append(tokens_BT)
        return model(torch.cat(seen, dim=1)).logits[:, -1]

    return step


@torch.no_grad()
def generate(
    step: StepFn,
    prompt_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Prompt plus up to `max_new_tokens` generated ids, [B, T + new]; stops early when every row emitted EOS."""
    generator = torch.Generator().manual_seed(seed)
    tokens, new, start = prompt_BT, prompt_BT, 0
    done = torch.zeros(prompt_BT.shape[0], dtype=torch.bool, device=prompt_BT.device)
    for _ in range(max_new_tokens):
        logits = step(new, start)
        start += new.shape[1]
        new = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, new], dim=1)
        if eos_id is not None:
            done |= new.squeeze(1) == eos_id
            if done.all():
                break
    return tokens
