"""A Llama decoder as in TinyLlama: pre-norm blocks, RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU (or a mixture of SwiGLU experts), no biases. Pure PyTorch: no distributed, I/O or training code."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import attend, resolve_backend
from model.config import ModelConfig
from model.loss import linear_cross_entropy
from model.moe import MoEFeedForward, RouterStats, swiglu


def rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight_D.shape, weight_D, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm_fn = rms_norm  # a device plug-in (cpu_kernels) may swap in an equal, faster function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_seq_len, head_dim], in Hugging Face Llama's rotate-half layout (frequencies repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles_TF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles_TD = torch.cat([angles_TF, angles_TF], dim=-1)
    return angles_TD.cos(), angles_TD.sin()


def apply_rope(x_BTHD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as roll(x) * [-1, 1] and the signs
    folded into the small sin table (three passes over x instead of five, forward and backward)."""
    half = x_BTHD.shape[-1] // 2
    signed_sin_TD = torch.cat([-sin_TD[:, :half], sin_TD[:, half:]], dim=-1)
    cos, sin = cos_TD[:, None, :].to(x_BTHD.dtype), signed_sin_TD[:, None, :].to(x_BTHD.dtype)
    return torch.addcmul(x_BTHD * cos, x_BTHD.roll(half, dims=-1), sin)


class KVCache:
    """Keys and values of one layer for decoding, [B, max_len, n_kv_heads, head_dim], allocated on first use in
    the dtype the layer computes in (bf16 under mixed precision even when the weights are fp32)."""

    def __init__(self, batch: int, max_len: int) -> None:
        self.batch, self.max_len = batch, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, start: int, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            shape = (self.batch, self.max_len, *k_BTKD.shape[2:])
            self.k = k_BTKD.new_zeros(shape)
            self.v = v_BTKD.new_zeros(shape)
        end = start + k_BTKD.shape[1]
        self.k[:, start:end] = k_BTKD
        self.v[:, start:end] = v_BTKD
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.attend_fn = attend  # (q, k, v, backend) -> out; a device plug-in (cpu_kernels) may swap it

    def forward(
        self, x_BTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, cache: KVCache | None, start: int
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        hd = self.cfg.head_dim
        q = apply_rope(self.q_proj(x_BTD).view(B, T, -1, hd), cos_TD, sin_TD)
        k = apply_rope(self.k_proj(x_BTD).view(B, T, -1, hd), cos_TD, sin_TD)
        v = self.v_proj(x_BTD).view(B, T, -1, hd)
        if cache is not None:
            k, v = cache.update(start, k, v)
        backend = resolve_backend(self.cfg.attention, q.device, q.dtype)
        return self.o_proj(self.attend_fn(q, k, v, backend).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, grouped_mm: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg, grouped_mm) if cfg.is_moe else FeedForward(cfg)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TD: torch.Tensor,
        sin_TD: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        h = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TD, sin_TD, cache, start)
        out = self.ffn(self.ffn_norm(h))
        out, stats = out if isinstance(out, tuple) else (out, None)
        return h + out, stats


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None  # [B, T, vocab], only when no targets are given
    # Mean next-token cross-entropy; while training with output_z_loss_coef > 0 its gradient is that of
    # loss + output_z_loss_coef * output_z_loss (model/loss.py): the value stays the cross-entropy.
    loss: torch.Tensor | None = None
    output_z_loss: torch.Tensor | None = None  # mean over tokens of log²Z of the output softmax (no gradient)
    aux_loss: torch.Tensor | None = None  # aux_loss_coef * balance_loss + z_loss_coef * z_loss (MoE only)
    balance_loss: torch.Tensor | None = None  # mean over layers
    z_loss: torch.Tensor | None = None  # mean over layers
    expert_load: torch.Tensor | None = None  # [n_layers, num_experts] fraction of routed slots


OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "down_proj")  # the residual branches' last matmuls


def init_std(cfg: ModelConfig, name: str) -> float | None:
    """TinyLlama's init of the parameter called `name` (whatever its prefix): None for the norm gains, which start
    at 1; else the std of its normal: 1/sqrt(dim)/n_layers for the output projections, sqrt(2 / (5 dim)) elsewhere."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(OUTPUT_PROJECTIONS):
        return 1.0 / math.sqrt(cfg.dim) / cfg.n_layers
    return math.sqrt(2.0 / (5 * cfg.dim))


@torch.no_grad()
def init_parameter_(
    tensor: torch.Tensor, name: str, cfg: ModelConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill `tensor`, the whole parameter `name`, with its initial value, drawing from `generator` (default: torch's
    global one). The same draws in the same order give the same weights, whoever fills them."""
    std = init_std(cfg, name)
    return tensor.fill_(1.0) if std is None else tensor.normal_(0.0, std, generator=generator)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, grouped_mm: bool = False) -> None:
        """`grouped_mm`: the MoE experts run as torch._grouped_mm (else a loop); the builder decides it once for
        the device it trains on (training/setup.py)."""
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, grouped_mm) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.loss_fn = linear_cross_entropy  # (h, w, targets, z coef) -> (loss, log²Z); a plug-in may swap it
        self.output_z_loss_coef = 0.0  # the output z-loss's weight in training (set from optim.output_z_loss_coef)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head when configured (again after `to_empty`, which unties them)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every parameter in turn (named_parameters' order) by init_parameter_, drawing from `generator` (default:
        torch's global one); then the rotary tables. training/materialize.py fills a sharded model with the values
        a fresh CPU generator seeded with the run's seed gives here."""
        for name, p in self.named_parameters():
            init_parameter_(p, name, self.cfg, generator)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        return [KVCache(batch, max_len) for _ in range(self.cfg.n_layers)]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        start: int = 0,
    ) -> ModelOutput:
        T = tokens_BT.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.tok_embeddings(tokens_BT)
        stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            x, layer_stats = layer(x, cos, sin, cache[i] if cache is not None else None, start)
            if layer_stats is not None:
                stats.append(layer_stats)
        x = self.norm(x)
        out = self._moe_output(stats) if stats else ModelOutput()
        if targets_BT is None:
            out.logits = self.lm_head(x)
        else:
            h, w, targets = x.flatten(0, 1), self.lm_head.weight, targets_BT.flatten()
            out.loss, out.output_z_loss = self.loss_fn(h, w, targets, self.output_z_loss_coef)
        return out

    def _moe_output(self, stats: list[RouterStats]) -> ModelOutput:
        # Each layer's balance loss is taken on its own statistics, then averaged: pooling the statistics of all
        # layers first (as transformers does) would let opposite imbalances in two layers cancel out.
        balance = torch.stack([s.balance_loss for s in stats]).mean()
        z_loss = torch.stack([s.z_loss for s in stats]).mean()
        return ModelOutput(
            aux_loss=self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * z_loss,
            balance_loss=balance,
            z_loss=z_loss,
            expert_load=torch.stack([s.load_E for s in stats]),
        )


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, built on the meta device so no memory is allocated."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    if not cfg.is_moe:
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_proj", "up_proj", "down_proj")))
    return total, total - expert + expert * cfg.top_k // cfg.num_experts
