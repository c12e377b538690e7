"""Model configuration: one dataclass (the named presets are configs/*.yaml, read by training/config.py
model_preset)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

# Fields that fix the shapes of the weights: two configs that agree on these can share a checkpoint.
SHAPE_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings", "num_experts")


@dataclass
class ModelConfig:
    """A Llama-style decoder; `num_experts > 0` swaps each dense SwiGLU FFN for a Mixtral-style MoE."""

    n_layers: int = 4
    dim: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_dim: int = 688
    vocab_size: int = 8192
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    num_experts: int = 0
    top_k: int = 2
    aux_loss_coef: float = 0.02
    z_loss_coef: float = 0.001
    attention: Literal["auto", "flash", "sdpa"] = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def validate(self) -> None:
        """Raise ValueError naming the offending key."""
        for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim model.dim/model.n_heads ({self.head_dim}) must be even for rotary embeddings")
        if self.num_experts == 1 or self.num_experts < 0:
            raise ValueError(f"model.num_experts must be 0 (dense) or at least 2, got {self.num_experts}")
        if self.is_moe and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.top_k ({self.top_k}) must be between 1 and model.num_experts ({self.num_experts})")

    def shape_mismatches(self, other: ModelConfig) -> list[str]:
        """Names of the weight-shaping fields on which `other` differs, as 'key: ours != theirs'."""
        return [
            f"model.{k}: {getattr(self, k)} != {getattr(other, k)}"
            for k in SHAPE_FIELDS
            if getattr(self, k) != getattr(other, k)
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, PaLM's formula: 6 x (weight-matrix parameters a token passes through, the head
    included, the input embedding not) + 12 x n_layers x dim x seq_len for attention scores."""
    hd = cfg.head_dim
    attn = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * cfg.dim * cfg.ffn_dim * (cfg.top_k if cfg.is_moe else 1) + (cfg.dim * cfg.num_experts)
    matmul = cfg.n_layers * (attn + ffn) + cfg.dim * cfg.vocab_size
    return 6 * matmul + 12 * cfg.n_layers * cfg.dim * seq_len
