"""Cross-entropy over the vocabulary without materialising [tokens, vocab] logits at once.

The output projection and the loss are computed together, chunk by chunk of tokens: each chunk's logits live only
while its loss and its gradients (w.r.t. the hidden states and the head weight) are taken, so peak memory is one
chunk of logits instead of the full [batch * seq, vocab] tensor plus its fp32 copy and gradient. Nothing in the
chunk loop reads a value back to the host.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 27  # logits per chunk: few, large matmuls, and 512 MiB of fp32 logits at most


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS // vocab_size)


def _chunk_nll_and_probs(
    h_CD: torch.Tensor, w_VD: torch.Tensor, t_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's negative log-likelihood (0 on ignored rows) and the softmax, both fp32, [C] and [C, V].

    Every row's loss is logsumexp minus the target's logit in fp32: exact whatever the target's probability."""
    logits_CV = (h_CD @ w_VD.t()).float()
    lse_C1 = torch.logsumexp(logits_CV, dim=-1, keepdim=True)
    target_logit_C = logits_CV.gather(1, t_C.clamp(min=0).unsqueeze(1)).squeeze(1)
    nll_C = (lse_C1.squeeze(1) - target_logit_C) * (t_C != IGNORE_INDEX)
    return nll_C, logits_CV.sub_(lse_C1).exp_()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ w.T) against targets; gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
        grad_h_ND = torch.empty_like(h_ND)
        # fp32 across chunks: each chunk's matmul accumulates in fp32, and rounding the running sum to bf16 after
        # every chunk would lose the small contributions of the later ones.
        grad_w_VD = torch.zeros_like(w_VD, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        rows = chunk_rows(w_VD.shape[0])
        for start in range(0, h_ND.shape[0], rows):
            h_CD, t_C = h_ND[start : start + rows], targets_N[start : start + rows]
            nll_C, probs_CV = _chunk_nll_and_probs(h_CD, w_VD, t_C)
            total += nll_C.sum()
            # d(mean nll)/d(logits) = (softmax - onehot) / n_valid on valid rows, 0 on ignored ones. In fp32: in
            # bf16, a confident target's p rounds to 1 and its gradient p - 1 to exactly 0.
            valid_C = t_C != IGNORE_INDEX
            probs_CV[torch.arange(len(t_C), device=t_C.device), t_C.clamp(min=0)] -= 1
            grad_CV = (probs_CV * (valid_C / n_valid).unsqueeze(1)).to(h_ND.dtype)
            torch.mm(grad_CV, w_VD, out=grad_h_ND[start : start + rows])
            grad_w_VD += (grad_CV.t() @ h_CD).float()
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
        _chunk_nll_and_probs(h_ND[s : s + rows], w_VD, targets_N[s : s + rows])[0].sum()
        for s in range(0, h_ND.shape[0], rows)
    )
    return total / n_valid
