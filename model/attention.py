"""Attention backends behind one function: flash-attn 2 where it can run, torch's SDPA elsewhere, and plain batched
matmuls for bf16 on a CPU, where they measured about twice as fast as SDPA's CPU kernel at training shapes."""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

FLASH_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("auto", "flash", "sdpa", "matmul")
MATMUL_MAX_SEQ = 1024  # the matmul path holds [batch, heads, seq, seq] scores: longer sequences go to SDPA


FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn 2 cannot run on this device and dtype, or None when it can."""
    if not FLASH_ATTN_INSTALLED:
        return "flash-attn is not installed (pip install flash-attn on a CUDA machine)"
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, got {device.type}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn needs fp16 or bf16 inputs, got {dtype}"
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map `auto|flash|sdpa|matmul` to the backend that runs; asking for flash where it cannot run is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attention must be one of {', '.join(BACKENDS)}, got {requested!r}")
    reason = flash_unavailable_reason(device, dtype)
    if requested == "flash" and reason:
        raise ValueError(f"model.attention=flash cannot run: {reason}")
    if requested != "auto":
        return requested
    if not reason:
        return "flash"
    return "matmul" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"


def attend(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal grouped-query attention, [B, T, heads, head_dim] in and out.

    Queries are the last Tq positions of the Tk keys (Tq == Tk in training, Tq < Tk when decoding with a cache).
    """
    if backend == "flash":
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask to the bottom right, which is what a cache needs; GQA is native.
        return flash_attn_func(q_BTHD, k_BTKD, v_BTKD, causal=True)
    tq, tk = q_BTHD.shape[1], k_BTKD.shape[1]
    if backend == "matmul" and tq == tk <= MATMUL_MAX_SEQ:
        return _matmul_attention(q_BTHD, k_BTKD, v_BTKD)
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    if tq == tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        # SDPA's is_causal aligns top-left; a query at offset tk - tq + i sees keys up to that position.
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)


QUERY_BLOCK = 256  # causal blocking of the matmul path: blocks of 256 query positions see only earlier keys


def _causal_bias(start: int, end: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[(end - start) * groups, end]: 0 where query position t (each repeated for its `groups` stacked heads) may
    attend to key s <= t, -inf on future keys."""
    t = torch.arange(start, end, device=device).repeat_interleave(groups)
    future = torch.arange(end, device=device) > t[:, None]
    return torch.zeros(future.shape, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


_cached_causal_bias = functools.cache(_causal_bias)  # eager calls reuse it; a compiled graph builds it in place


def _matmul_attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + causal mask) V as batched matmuls over blocks of query positions, each against
    only the keys up to its last position (at 512 positions: 3/4 of the work and memory of full scores; blocks of
    256 measured faster than 128 or 512). The query heads that share a K/V head are stacked position-major, so K
    and V are never repeated and a block of positions is a contiguous slice; the scale goes on Q and the mask is
    added inside the first matmul."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    G = H // K
    q_NTgD = (q_BTHD * (1.0 / math.sqrt(D))).view(B, T, K, G, D).transpose(1, 2).reshape(B * K, T * G, D)
    k_NDT = k_BTKD.permute(0, 2, 3, 1).reshape(B * K, D, T)
    v_NTD = v_BTKD.transpose(1, 2).reshape(B * K, T, D)
    bias = _causal_bias if torch.compiler.is_compiling() else _cached_causal_bias
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, T)
        q_block = q_NTgD[:, start * G : end * G]
        scores = torch.baddbmm(bias(start, end, G, q_block.dtype, q_block.device), q_block, k_NDT[:, :, :end])
        blocks.append(torch.softmax(scores, dim=-1) @ v_NTD[:, :end])
    out_NTgD = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
    return out_NTgD.view(B, K, T, G, D).transpose(1, 2).reshape(B, T, H, D)
