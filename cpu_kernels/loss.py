"""model.loss.linear_cross_entropy for a CPU: probabilities in the logits' dtype, softmax in place, the head-weight
gradient added up in the weight's dtype, CPU-sized chunks. In bf16 this trades the reference's fp32 softmax and
accumulation for fewer passes over [rows, vocab] tensors (tests/test_cpu_kernels.py bounds the difference)."""

from __future__ import annotations

import torch

from model.loss import IGNORE_INDEX

# Logits per chunk: 4M (512 rows of an 8192 vocabulary) keeps a chunk's logits within a CPU's caches' reach while
# the matmuls stay large.
CHUNK_ELEMENTS = 1 << 22
# Each chunk's head-weight gradient re-reads and re-writes the whole [vocab, dim] gradient, so a chunk needs enough
# rows to amortise that.
MIN_CHUNK_ROWS = 1024
TINY_PROB = 1e-30  # below this a target's probability loses precision: its loss is taken from the logits


def chunk_rows(vocab_size: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)


def _chunk_probs_nll_and_lse(
    h_CD: torch.Tensor, w_VD: torch.Tensor, t_C: torch.Tensor, valid_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(h @ w.T) [C, V] in the logits' dtype (the kernel accumulates in fp32; bf16 probabilities are as
    precise as the bf16 logits they come from, and converting to fp32 and back cost two more passes), and each
    valid row's fp32 negative log-likelihood and log-partition log Z, [C] (0 on the other rows). One softmax pass
    gives the loss (-log p of the target), log Z (the target's logit minus log p: no pass of its own) and the
    gradient (p - onehot); it runs in place, so a chunk holds one [C, V] tensor."""
    logits_CV = h_CD @ w_VD.t()
    target_C1 = t_C.clamp(min=0).unsqueeze(1)
    target_logit_C = logits_CV.gather(1, target_C1).squeeze(1).float()
    probs_CV = torch.softmax(logits_CV, dim=-1, out=logits_CV)
    p_target_C = probs_CV.gather(1, target_C1).squeeze(1).float()
    nll_C = -p_target_C.log()
    tiny_C = (p_target_C < TINY_PROB) & valid_C
    if tiny_C.any():  # rare: a very confident wrong prediction; log-sum-exp keeps its loss exact
        rows = (h_CD[tiny_C] @ w_VD.t()).float()  # the logits again: softmax overwrote them
        nll_C[tiny_C] = torch.logsumexp(rows, dim=-1) - rows.gather(1, target_C1[tiny_C]).squeeze(1)
    nll_C = torch.where(valid_C, nll_C, 0.0)  # where, not a product: an ignored row's -log p may be inf
    return probs_CV, nll_C, torch.where(valid_C, target_logit_C + nll_C, 0.0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ w.T) against targets and the mean log²Z; gradients are computed in forward,
    chunk by chunk, for cross-entropy + z_loss_coef x log²Z."""

    @staticmethod
    def forward(
        ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, z_loss_coef: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
        grad_h_ND = torch.empty_like(h_ND)
        rows = chunk_rows(w_VD.shape[0])
        # The chunks' head-weight gradients add up in place in the weight's dtype (the matmul accumulates in fp32
        # within a chunk): an fp32 accumulator costs a conversion and an add per chunk.
        grad_w_VD = torch.empty_like(w_VD)
        total, total_z = (torch.zeros((), dtype=torch.float32, device=h_ND.device) for _ in range(2))
        for start in range(0, h_ND.shape[0], rows):
            h_CD, t_C = h_ND[start : start + rows], targets_N[start : start + rows]
            valid_C = t_C != IGNORE_INDEX
            probs_CV, nll_C, lse_C = _chunk_probs_nll_and_lse(h_CD, w_VD, t_C, valid_C)
            total += nll_C.sum()
            total_z += lse_C.square().sum()
            # d(nll + c log²Z)/d(logits) = p a - onehot with a = 1 + 2c log Z per row, times 1 / n_valid on valid
            # rows and 0 on the others: written (p - onehot / a) * scale with scale = a / n_valid, the subtraction
            # in place and the fp32 row scale on the [C, D] sides of the matmuls, each product rounded once (a
            # scale rounded to bf16 first would quantise a = 1.001 to 1 and lose the z-loss).
            # (indexing, not scatter: a CPU's scatter round-trips whole bf16 tensors through fp32 copies)
            a_C = 1 + 2 * z_loss_coef * lse_C
            at_target = (torch.arange(len(t_C), device=t_C.device), t_C.clamp(min=0))
            grad_CV = probs_CV.index_put_(at_target, (probs_CV[at_target] - 1 / a_C).to(probs_CV.dtype))
            scale_C1 = (a_C * valid_C / n_valid).unsqueeze(1)
            torch.mm(grad_CV, w_VD, out=grad_h_ND[start : start + rows]).mul_(scale_C1)
            h_scaled_CD = (h_CD * scale_C1).to(h_CD.dtype)
            grad_w_VD.addmm_(grad_CV.t(), h_scaled_CD, beta=float(start > 0))  # beta 0: ignore the empty
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        z_loss = total_z / n_valid
        ctx.mark_non_differentiable(z_loss)
        return total / n_valid, z_loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_z_loss: torch.Tensor):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return grad_h_ND * grad_loss, grad_w_VD * grad_loss, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, z_loss_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy of logits h @ w.T, mean log²Z), as model.loss.linear_cross_entropy."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, z_loss_coef)
    n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
    rows = chunk_rows(w_VD.shape[0])
    total, total_z = 0.0, 0.0
    for s in range(0, h_ND.shape[0], rows):
        t_C = targets_N[s : s + rows]
        _, nll_C, lse_C = _chunk_probs_nll_and_lse(h_ND[s : s + rows], w_VD, t_C, t_C != IGNORE_INDEX)
        total, total_z = total + nll_C.sum(), total_z + lse_C.square().sum()
    return total / n_valid, total_z / n_valid
