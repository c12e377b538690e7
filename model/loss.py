"""Cross-entropy over the vocabulary without materialising [tokens, vocab] logits at once.

The output projection and the loss are computed together, chunk by chunk of tokens: each chunk's logits live in
fp32 only while its loss and its gradients (w.r.t. the hidden states and the head weight) are taken, so peak memory
is one chunk of logits instead of the full [batch * seq, vocab] tensor plus its fp32 copy and gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _chunk_logits(h_CD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    return (h_CD @ w_VD.t()).float()


def _chunk_nll(logits_CV: torch.Tensor, targets_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the valid targets, the log-sum-exp per row and the validity mask."""
    valid_C = targets_C != IGNORE_INDEX
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    target_logit_C = logits_CV.gather(1, targets_C.clamp(min=0).unsqueeze(1)).squeeze(1)
    nll = ((lse_C - target_logit_C) * valid_C).sum()
    return nll, lse_C, valid_C


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ w.T) against targets; gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
        grad_h_ND = torch.empty_like(h_ND)
        rows = chunk_rows(w_VD.shape[0])
        # Several chunks add up their head-weight gradients in fp32; a single chunk writes it once, in place.
        acc_dtype = w_VD.dtype if h_ND.shape[0] <= rows else torch.float32
        grad_w_VD = torch.zeros(w_VD.shape, dtype=acc_dtype, device=w_VD.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for start in range(0, h_ND.shape[0], rows):
            h_CD, t_C = h_ND[start : start + rows], targets_N[start : start + rows]
            logits_CV = _chunk_logits(h_CD, w_VD)
            nll, lse_C, valid_C = _chunk_nll(logits_CV, t_C)
            total += nll
            # d(mean nll)/d(logits) = (softmax - onehot) / n_valid on valid rows, computed in place on the logits.
            grad_CV = logits_CV.sub_(lse_C.unsqueeze(1)).exp_()
            grad_CV[torch.arange(len(t_C), device=t_C.device), t_C.clamp(min=0)] -= 1
            grad_CV.mul_((valid_C / n_valid).unsqueeze(1))
            grad_CV = grad_CV.to(h_ND.dtype)
            torch.mm(grad_CV, w_VD, out=grad_h_ND[start : start + rows])
            if acc_dtype == w_VD.dtype:
                grad_w_VD.addmm_(grad_CV.t(), h_CD)
            else:
                grad_w_VD += grad_CV.t() @ h_CD
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return grad_h_ND * grad_loss, grad_w_VD * grad_loss, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits h @ w.T (positions with target -100 are ignored)."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N)
    n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
    rows = chunk_rows(w_VD.shape[0])
    total = sum(
        _chunk_nll(_chunk_logits(h_ND[s : s + rows], w_VD), targets_N[s : s + rows])[0]
        for s in range(0, h_ND.shape[0], rows)
    )
    return total / n_valid
