"""The MoE's dispatch, experts and combine for a CPU: each expert's rows padded in bf16, the experts as one autograd
function over per-stage buffers, dispatch and combine as gathers in both directions (each is the other's backward).
Same results as model.moe.sparse_ffn, which the tests check."""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from model.moe import Routing, sorted_rows

BF16_ROW_ALIGN = 64


def row_alignment(x: torch.Tensor) -> int:
    """Each expert's slice of rows is padded to a multiple of this: oneDNN builds a bf16 matmul kernel per new row
    count on a CPU (slower and growing memory when the counts change every step; multiples of 64 keep the set of
    shapes small)."""
    return BF16_ROW_ALIGN if x.dtype == torch.bfloat16 else 1


class _LoopedExperts(torch.autograd.Function):
    """Each non-empty expert's SwiGLU on its contiguous slice of the expert-sorted rows, by matmuls that write into
    one buffer per stage, so the activation runs once over all rows and backward writes each expert's weight
    gradient straight into the stacked gradient. Autograd through per-expert slices would concatenate the outputs,
    the input gradients and the stacked weight gradients again, and run the activation once per slice."""

    @staticmethod
    def forward(
        ctx, x_RD: torch.Tensor, counts: list[int], gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor
    ) -> torch.Tensor:
        ends = list(itertools.accumulate(counts))
        spans = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, ends)) if n]
        gate_SF = x_RD.new_empty(ends[-1], gate_EFD.shape[1])
        up_SF = torch.empty_like(gate_SF)
        for e, a, b in spans:
            torch.mm(x_RD[a:b], gate_EFD[e].t(), out=gate_SF[a:b])
            torch.mm(x_RD[a:b], up_EFD[e].t(), out=up_SF[a:b])
        act_SF = F.silu(gate_SF)
        h_SF = act_SF * up_SF
        y_SD = x_RD.new_empty(ends[-1], x_RD.shape[1])
        for e, a, b in spans:
            torch.mm(h_SF[a:b], down_EDF[e].t(), out=y_SD[a:b])
        ctx.spans = spans
        ctx.save_for_backward(x_RD, gate_EFD, up_EFD, down_EDF, gate_SF, up_SF, act_SF, h_SF)
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: torch.Tensor):
        x_RD, gate_EFD, up_EFD, down_EDF, gate_SF, up_SF, act_SF, h_SF = ctx.saved_tensors
        # Every expert's weight gradient is written below, unless an expert got no rows: then they start at zero.
        new_grad = torch.empty_like if len(ctx.spans) == len(gate_EFD) else torch.zeros_like
        d_gate, d_up, d_down = new_grad(gate_EFD), new_grad(up_EFD), new_grad(down_EDF)
        dh_SF = torch.empty_like(gate_SF)
        for e, a, b in ctx.spans:
            torch.mm(dy_SD[a:b], down_EDF[e], out=dh_SF[a:b])
            torch.mm(dy_SD[a:b].t(), h_SF[a:b], out=d_down[e])
        d_up_SF = dh_SF * act_SF
        d_gate_SF = torch.ops.aten.silu_backward(dh_SF.mul_(up_SF), gate_SF)
        dx_RD = torch.empty_like(x_RD)
        dx_RD[len(gate_SF) :].zero_()  # rows past the last expert's slice feed no expert
        for e, a, b in ctx.spans:
            torch.mm(d_gate_SF[a:b].t(), x_RD[a:b], out=d_gate[e])
            torch.mm(d_up_SF[a:b].t(), x_RD[a:b], out=d_up[e])
            torch.mm(d_gate_SF[a:b], gate_EFD[e], out=dx_RD[a:b]).addmm_(d_up_SF[a:b], up_EFD[e])
        return dx_RD, None, d_gate, d_up, d_down


def experts_looped(
    x_RD: torch.Tensor, counts: list[int], gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    """The experts on the first sum(counts) expert-sorted rows, expert e on the next counts[e] of them."""
    return _LoopedExperts.apply(x_RD, counts, gate_EFD, up_EFD, down_EDF)


class _Dispatch(torch.autograd.Function):
    """Tokens to expert-sorted rows: row r holds token token_of_row[r]. Backward gathers each token's k rows and
    adds them up, where index_select's own backward would scatter-add (on a CPU that round-trips bf16 through
    fp32)."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, token_of_row_R: torch.Tensor, rows_NK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows_NK)
        return x_ND.index_select(0, token_of_row_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        (rows_NK,) = ctx.saved_tensors
        grad_NKD = grad_RD.index_select(0, rows_NK.flatten()).view(*rows_NK.shape, -1)
        return functools.reduce(torch.add, grad_NKD.unbind(1)), None, None


class _Combine(torch.autograd.Function):
    """Expert-sorted rows back to tokens: out[n] = sum over k of weights[n, k] * y[rows[n, k]]. Backward is a
    gather too: row r's gradient is its token's output gradient times its slot's weight, and padding rows, which
    belong to no slot, get weight 0."""

    @staticmethod
    def forward(
        ctx, y_RD: torch.Tensor, weights_NK: torch.Tensor, rows_NK: torch.Tensor, token_of_row_R: torch.Tensor
    ) -> torch.Tensor:
        y_NKD = y_RD.index_select(0, rows_NK.flatten()).view(*rows_NK.shape, -1)
        w_NK = weights_NK.to(y_RD.dtype)
        out_ND = y_NKD[:, 0] * w_NK[:, :1]
        for k in range(1, w_NK.shape[1]):
            out_ND.addcmul_(y_NKD[:, k], w_NK[:, k : k + 1])
        ctx.save_for_backward(y_NKD, w_NK, rows_NK, token_of_row_R[: len(y_RD)])
        ctx.weights_dtype = weights_NK.dtype
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        y_NKD, w_NK, rows_NK, token_of_row_R = ctx.saved_tensors
        weight_of_row_R = w_NK.new_zeros(len(token_of_row_R)).index_put_((rows_NK.flatten(),), w_NK.flatten())
        grad_RD = grad_ND.index_select(0, token_of_row_R).mul_(weight_of_row_R.unsqueeze(1))
        grad_NK = torch.linalg.vecdot(y_NKD, grad_ND.unsqueeze(1)).to(ctx.weights_dtype)
        return grad_RD, grad_NK, None, None


def sparse_ffn(
    x_ND: torch.Tensor,
    routing: Routing,
    counts_E: torch.Tensor,
    gate_EFD: torch.Tensor,
    up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    grouped_mm: bool,
) -> torch.Tensor:
    """model.moe.sparse_ffn with the looped experts (`grouped_mm` is ignored: on a CPU torch._grouped_mm is no
    faster than this loop and holds more memory)."""
    rows_NK, token_of_row, rows_E = sorted_rows(routing.experts_NK, counts_E, row_alignment(x_ND))
    x_RD = _Dispatch.apply(x_ND, token_of_row, rows_NK)
    y_RD = _LoopedExperts.apply(x_RD, rows_E.tolist(), gate_EFD, up_EFD, down_EDF)
    return _Combine.apply(y_RD, routing.weights_NK, rows_NK, token_of_row)
