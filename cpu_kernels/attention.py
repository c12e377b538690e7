"""bf16 attention on a CPU as plain batched matmuls, where SDPA's CPU kernel is the slower one at training shapes
(head dims of 32 to 64, a few hundred positions): K/V shared per group, the scale on Q, the mask inside baddbmm."""

from __future__ import annotations

import functools
import math

import torch

from model.attention import attend as reference_attend

MATMUL_MAX_SEQ = 1024  # the matmul path holds [batch, heads, seq, seq] scores: longer sequences go to SDPA


def attend(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, backend: str) -> torch.Tensor:
    """model.attention.attend, by batched matmuls for bf16 (the dtype they win in); the reference otherwise."""
    if q_BTHD.dtype != torch.bfloat16:
        return reference_attend(q_BTHD, k_BTKD, v_BTKD, backend)
    return _matmul_attention_or_reference(q_BTHD, k_BTKD, v_BTKD, backend)


def _matmul_attention_or_reference(
    q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, backend: str
) -> torch.Tensor:
    """The matmul path for full causal attention (Tq == Tk) over at most MATMUL_MAX_SEQ positions, in any dtype;
    the reference for decoding steps and long sequences."""
    tq, tk = q_BTHD.shape[1], k_BTKD.shape[1]
    if backend == "sdpa" and tq == tk <= MATMUL_MAX_SEQ:
        return _matmul_attention(q_BTHD, k_BTKD, v_BTKD)
    return reference_attend(q_BTHD, k_BTKD, v_BTKD, backend)


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
    only the keys up to its last position (at 512 positions: 3/4 of the work and memory of full scores; a block of
    256 queries keeps each matmul large while skipping most future keys). The query heads that share a K/V head
    are stacked position-major, so K and V are never repeated and a block of positions is a contiguous slice; the
    scale goes on Q and the mask is added inside the first matmul."""
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
