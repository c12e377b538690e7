"""Attention backends behind one function: flash-attn 2 where it can run, else torch's SDPA."""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn 2 cannot run on this device and dtype, or None when it can."""
    if not flash_attn_installed():
        return "flash-attn is not installed (pip install flash-attn on a CUDA machine)"
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, got {device.type}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn needs fp16 or bf16 inputs, got {dtype}"
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map `auto|flash|sdpa` to the backend that runs; asking for flash where it cannot run is an error."""
    if requested == "sdpa":
        return "sdpa"
    reason = flash_unavailable_reason(device, dtype)
    if requested == "flash":
        if reason:
            raise ValueError(f"model.attention=flash cannot run: {reason}")
        return "flash"
    if requested == "auto":
        return "sdpa" if reason else "flash"
    raise ValueError(f"model.attention must be auto, flash or sdpa, got {requested!r}")


def attend(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal grouped-query attention, [B, T, heads, head_dim] in and out.

    Queries are the last Tq positions of the Tk keys (Tq == Tk in training, Tq < Tk when decoding with a cache).
    """
    if backend == "flash":
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask to the bottom right, which is what a cache needs; GQA is native.
        return flash_attn_func(q_BTHD, k_BTKD, v_BTKD, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        # SDPA's is_causal aligns top-left; a query at offset tk - tq + i sees keys up to that position.
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)
