"""CPU fast paths for the reference model in model/, applied in one call when a model is built for a CPU.

Each replaces one function attribute the reference exposes for this, with a function that computes the same thing
(tests/test_cpu_kernels.py compares outputs and gradients against the reference) in a way a CPU runs faster: a
hand-written RMSNorm backward, batched-matmul attention for bf16, the MoE experts as one autograd function over
padded per-expert slices with gather-only dispatch and combine, and the loss with bf16 probabilities in CPU-sized
chunks. Under torch.compile the MoE function breaks the block's graph (it reads the expert counts on the host),
as the CPU path always did; per-block compilation still compiles the rest. Tools that load a checkpoint to score or
decode (tools/, formats/checkpoint.py load_model) build the reference model without it."""

from __future__ import annotations

from collections.abc import Collection

from cpu_kernels.attention import attend
from cpu_kernels.loss import linear_cross_entropy
from cpu_kernels.moe import sparse_ffn
from cpu_kernels.norm import rms_norm
from model.llama import Attention, RMSNorm, Transformer
from model.moe import MoEFeedForward

FAST_PATHS = ("loss", "norm", "attention", "moe")


def apply_cpu_kernels(model: Transformer, paths: Collection[str] = FAST_PATHS) -> Transformer:
    """Swap the CPU fast paths named in `paths` (all by default; bench/cpu_kernels.py leaves one out to measure it)
    into `model` in place (and return it). The matmul attention replaces only the `auto` backend: an explicit
    `model.attention: sdpa` stays SDPA."""
    if "loss" in paths:
        model.loss_fn = linear_cross_entropy
    for module in model.modules():
        if isinstance(module, RMSNorm) and "norm" in paths:
            module.norm_fn = rms_norm
        elif isinstance(module, Attention) and module.cfg.attention == "auto" and "attention" in paths:
            module.attend_fn = attend
        elif isinstance(module, MoEFeedForward) and "moe" in paths:
            module.sparse_ffn_fn = sparse_ffn
    return model
