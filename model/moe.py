"""Mixtral-style sparse mixture of SwiGLU experts: fp32 top-k router, dropless sorted dispatch."""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


class RouterStats(NamedTuple):
    """One MoE layer's auxiliary losses (differentiable) and per-expert load fractions (detached)."""

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    load_E: torch.Tensor


class Routing(NamedTuple):
    logits_NE: torch.Tensor  # fp32
    probs_NE: torch.Tensor  # softmax over all experts
    weights_NK: torch.Tensor  # top-k probabilities renormalised to sum to 1
    experts_NK: torch.Tensor  # chosen expert ids


def route(x_ND: torch.Tensor, router_ED: torch.Tensor, top_k: int) -> Routing:
    """Mixtral's rule: softmax over all experts in fp32, keep the top k, renormalise them."""
    logits_NE = x_ND.float() @ router_ED.float().t()
    probs_NE = logits_NE.softmax(dim=-1)
    top_NK, experts_NK = probs_NE.topk(top_k, dim=-1)
    return Routing(logits_NE, probs_NE, top_NK / top_NK.sum(dim=-1, keepdim=True), experts_NK)


def router_stats(routing: Routing, counts_E: torch.Tensor) -> RouterStats:
    """Switch load-balancing loss and router z-loss of one layer.

    balance = E * sum_e f_e * P_e, with f_e the fraction of the N*k routed slots that went to expert e (so it is
    divided by top_k) and P_e the mean router probability of e: a uniform router gives exactly 1.0.
    """
    n_experts = routing.probs_NE.shape[1]
    load_E = counts_E.float() / counts_E.sum()
    balance = n_experts * (load_E * routing.probs_NE.mean(dim=0)).sum()
    z_loss = torch.logsumexp(routing.logits_NE, dim=-1).square().mean()
    return RouterStats(balance, z_loss, load_E.detach())


def swiglu(x: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate_FD)) * F.linear(x, up_FD), down_DF)


class _LoopedExperts(torch.autograd.Function):
    """Each non-empty expert's SwiGLU on its contiguous slice of the expert-sorted rows, by matmuls that write into
    one buffer per stage, so the activation runs once over all rows and backward writes each expert's weight
    gradient straight into the stacked gradient. Autograd through per-expert slices would concatenate the outputs,
    the input gradients and the stacked weight gradients again: together with the per-slice activations that
    measured 10% slower per layer on a CPU."""

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


def experts_grouped(
    x_SD: torch.Tensor, counts_E: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    """All experts in three grouped matmuls over the expert-sorted tokens (no host sync on the counts)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    h_SF = F.silu(torch._grouped_mm(x_SD, gate_EFD.transpose(1, 2), offs=offs))
    h_SF = h_SF * torch._grouped_mm(x_SD, up_EFD.transpose(1, 2), offs=offs)
    return torch._grouped_mm(h_SF, down_EDF.transpose(1, 2), offs=offs)


def row_alignment(x: torch.Tensor, grouped: bool) -> int:
    """Each expert's slice of rows is padded to a multiple of this: torch._grouped_mm wants 16-byte aligned groups,
    and oneDNN builds a bf16 matmul kernel per new row count on a CPU (44% slower and growing memory when the
    counts change every step; multiples of 64 keep the set of shapes small)."""
    if grouped:
        return 16
    return 64 if x.device.type == "cpu" and x.dtype == torch.bfloat16 else 1


def padded_slots(
    sorted_experts_S: torch.Tensor, counts_E: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each expert-sorted slot goes when every expert's rows start at a multiple of `align`, and the padded
    row counts. Computed on the device, without a host sync."""
    padded_E = (counts_E + align - 1) // align * align
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
    return torch.arange(len(sorted_experts_S), device=counts_E.device) + shift_E[sorted_experts_S], padded_E


def use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm's fast path: bf16 on Hopper or newer."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class _Dispatch(torch.autograd.Function):
    """Tokens to expert-sorted rows: row r holds token token_of_row[r]. Backward gathers each token's k rows and
    adds them up, where index_select's own backward would scatter-add (on a CPU that round-trips bf16 through fp32
    and measured 5x slower than the gather)."""

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


def sorted_rows(
    experts_NK: torch.Tensor, counts_E: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert-sorted layout: the row of each (token, k) slot [N, K], the token of each row [capacity] (padding
    rows hold token 0: their outputs are never combined and get no gradient), and each expert's row count."""
    flat_experts = experts_NK.reshape(-1)
    order = flat_experts.argsort(stable=True)
    row_of_sorted, rows_E = padded_slots(flat_experts[order], counts_E, align)
    capacity = len(order) + len(counts_E) * (align - 1)
    rows_NK = torch.empty_like(order).index_put_((order,), row_of_sorted).view_as(experts_NK)
    token_of_row = order.new_zeros(capacity).index_put_((row_of_sorted,), order // experts_NK.shape[1])
    return rows_NK, token_of_row, rows_E


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts; expert weights stacked as [num_experts, ...]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.ffn_dim, cfg.dim))
        self.up_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.ffn_dim, cfg.dim))
        self.down_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim, cfg.ffn_dim))
        self.grouped_mm: bool | None = None  # None: decide per device and dtype

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = route(x_ND, self.router.weight, self.top_k)
        counts_E = torch.bincount(routing.experts_NK.flatten(), minlength=self.gate_proj.shape[0])
        grouped = use_grouped_mm(x_ND) if self.grouped_mm is None else self.grouped_mm
        rows_NK, token_of_row, rows_E = sorted_rows(routing.experts_NK, counts_E, row_alignment(x_ND, grouped))
        x_RD = _Dispatch.apply(x_ND, token_of_row, rows_NK)
        if grouped:
            y_RD = experts_grouped(x_RD, rows_E, self.gate_proj, self.up_proj, self.down_proj)
        else:
            y_RD = experts_looped(x_RD, rows_E.tolist(), self.gate_proj, self.up_proj, self.down_proj)
        out_ND = _Combine.apply(y_RD, routing.weights_NK, rows_NK, token_of_row)
        return out_ND.view_as(x_BTD), router_stats(routing, counts_E)
