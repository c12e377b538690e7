"""Attention backends behind one function: flash-attn 2 where it is installed and runs, torch's SDPA elsewhere."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

FLASH_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("auto", "flash", "sdpa")

# Why flash-attn cannot run, per (device, dtype); probed once, at the first resolve_backend for that pair (the
# builder's check runs it before training, so a compiled forward only reads this dict).
_flash_problems: dict[tuple[torch.device, torch.dtype], str | None] = {}


def _probe_flash_attn(device: torch.device) -> str | None:
    """Import flash-attn and run one tiny call: a wheel built for another torch or GPU imports (or even loads)
    fine and fails only with an undefined symbol or a missing kernel image, so finding the package is not enough."""
    try:
        from flash_attn import flash_attn_func

        q = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.bfloat16)
        flash_attn_func(q, q, q, causal=True)
    except ModuleNotFoundError:
        return "flash-attn is not installed (pip install flash-attn on a CUDA machine)"
    except Exception as e:  # ImportError (undefined symbol), RuntimeError (no kernel for this GPU), ...
        return f"flash-attn is installed but does not run here: {str(e).splitlines()[0] if str(e) else type(e)}"
    return None


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn 2 cannot run on this device and dtype, or None when it can."""
    if torch.device(device).type != "cuda":  # flash-attn's kernels exist only for CUDA
        return f"flash-attn needs a CUDA device, got {device}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn needs fp16 or bf16 inputs, got {dtype}"
    key = (torch.device(device), dtype)
    if key not in _flash_problems:
        _flash_problems[key] = _probe_flash_attn(torch.device(device))
    return _flash_problems[key]


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map `auto|flash|sdpa` to the backend that runs; asking for flash where it cannot run is an error, `auto`
    falls back to SDPA (with a one-line notice when flash-attn is installed but broken)."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attention must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "sdpa":
        return "sdpa"
    reason = flash_unavailable_reason(device, dtype)
    if requested == "flash" and reason:
        raise ValueError(f"model.attention=flash cannot run: {reason}")
    if reason and "does not run here" in reason and not torch.compiler.is_compiling():
        _warn_once(f"{reason}; attention falls back to SDPA")
    return "sdpa" if reason else "flash"


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"notice: {message}", file=sys.stderr)


def attend(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal grouped-query attention, [B, T, heads, head_dim] in and out.

    Queries are the last Tq positions of the Tk keys (Tq == Tk in training, Tq < Tk when decoding with a cache).
    """
    if backend == "flash":
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask to the bottom right, which is what a cache needs; GQA is native.
        return flash_attn_func(q_BTHD, k_BTKD, v_BTKD, causal=True)
    tq, tk = q_BTHD.shape[1], k_BTKD.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    # K/V are never repeated: SDPA's flash kernel takes enable_gqa itself (its CUDA constraints accept fewer K/V
    # heads than query heads), as do the math and CPU kernels. Only the memory-efficient kernel refuses it.
    if tq == tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif tq == 1:  # one new query sees every cached key: no mask, so the fused kernels stay eligible
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        # SDPA's is_causal aligns top-left; a query at offset tk - tq + i sees keys up to that position.
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)
