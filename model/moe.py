"""Mixtral-style sparse mixture of SwiGLU experts: fp32 top-k router, dropless sorted dispatch."""

from __future__ import annotations

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


GROUPED_MM_ALIGN = 16  # torch._grouped_mm wants 16-byte aligned groups: every expert's rows padded to a multiple


def swiglu(x: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate_FD)) * F.linear(x, up_FD), down_DF)


def experts_looped(
    x_SD: torch.Tensor, counts_E: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    """Expert e's SwiGLU on its contiguous slice of the expert-sorted rows, one expert after the other. Slicing
    needs the counts on the host: one sync per layer (and a graph break under torch.compile), the price of running
    where torch._grouped_mm does not."""
    slices = x_SD.split(counts_E.tolist())
    return torch.cat([swiglu(x, *w) for x, *w in zip(slices, gate_EFD, up_EFD, down_EDF)])


def experts_grouped(
    x_SD: torch.Tensor, counts_E: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    """All experts in three grouped matmuls over the expert-sorted rows (no host sync on the counts). The last
    expert's group runs to the last row: torch leaves the input gradient of rows outside every group unwritten, and
    the padding rows past the last slice must get a gradient of 0 (their outputs are never combined)."""
    ends_E = counts_E.cumsum(0)
    offs = torch.cat([ends_E[:-1], ends_E.new_full((1,), len(x_SD))]).to(torch.int32)
    h_SF = F.silu(torch._grouped_mm(x_SD, gate_EFD.transpose(1, 2), offs=offs))
    h_SF = h_SF * torch._grouped_mm(x_SD, up_EFD.transpose(1, 2), offs=offs)
    return torch._grouped_mm(h_SF, down_EDF.transpose(1, 2), offs=offs)


def padded_slots(
    sorted_experts_S: torch.Tensor, counts_E: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each expert-sorted slot goes when every expert's rows start at a multiple of `align`, and the padded
    row counts. Computed on the device, without a host sync."""
    padded_E = (counts_E + align - 1) // align * align
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
    return torch.arange(len(sorted_experts_S), device=counts_E.device) + shift_E[sorted_experts_S], padded_E


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


def expert_counts(experts_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots routed to each expert, [E], on the device (no host sync, unlike torch.bincount on CUDA)."""
    flat = experts_NK.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sparse_ffn(
    x_ND: torch.Tensor,
    routing: Routing,
    counts_E: torch.Tensor,
    gate_EFD: torch.Tensor,
    up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    grouped_mm: bool,
) -> torch.Tensor:
    """Dispatch the tokens to their experts' rows, run the experts, combine their outputs with the router weights,
    in plain differentiable ops: a gather in, the experts, a gather out and a weighted sum over the k slots."""
    align = GROUPED_MM_ALIGN if grouped_mm else 1
    rows_NK, token_of_row_R, rows_E = sorted_rows(routing.experts_NK, counts_E, align)
    x_RD = x_ND.index_select(0, token_of_row_R)
    experts = experts_grouped if grouped_mm else experts_looped
    y_RD = experts(x_RD, rows_E, gate_EFD, up_EFD, down_EDF)
    y_NKD = y_RD.index_select(0, rows_NK.flatten()).view(*rows_NK.shape, -1)
    return (y_NKD * routing.weights_NK.to(y_NKD.dtype).unsqueeze(2)).sum(dim=1)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts; expert weights stacked as [num_experts, ...]."""

    def __init__(self, cfg: ModelConfig, grouped_mm: bool = False) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.ffn_dim, cfg.dim))
        self.up_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.ffn_dim, cfg.dim))
        self.down_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim, cfg.ffn_dim))
        self.grouped_mm = grouped_mm  # the experts by torch._grouped_mm, else a loop: fixed when the model is built
        self.sparse_ffn_fn = sparse_ffn  # a device plug-in (cpu_kernels) may swap in an equal, faster function

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = route(x_ND, self.router.weight, self.top_k)
        counts_E = expert_counts(routing.experts_NK, self.gate_proj.shape[0])
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        out_ND = self.sparse_ffn_fn(x_ND, routing, counts_E, *weights, self.grouped_mm)
        return out_ND.view_as(x_BTD), router_stats(routing, counts_E)
