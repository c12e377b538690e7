"""Cross-entropy over the vocabulary without materialising [tokens, vocab] logits at once, with an optional output
z-loss (PaLM): a coefficient times the mean over tokens of log²Z, Z the softmax's partition function, which keeps the
log-partition near 0 and the logits from drifting (a cause of late loss spikes in bf16).

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


def _chunk_nll_lse_and_probs(
    h_CD: torch.Tensor, w_VD: torch.Tensor, t_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's negative log-likelihood (0 on ignored rows), its log-partition log Z and the softmax, all fp32,
    [C], [C] and [C, V].

    Every row's loss is logsumexp minus the target's logit in fp32: exact whatever the target's probability."""
    logits_CV = (h_CD @ w_VD.t()).float()
    lse_C1 = torch.logsumexp(logits_CV, dim=-1, keepdim=True)
    target_logit_C = logits_CV.gather(1, t_C.clamp(min=0).unsqueeze(1)).squeeze(1)
    nll_C = (lse_C1.squeeze(1) - target_logit_C) * (t_C != IGNORE_INDEX)
    return nll_C, lse_C1.squeeze(1), logits_CV.sub_(lse_C1).exp_()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ w.T) against targets and the mean log²Z; gradients are computed in forward,
    chunk by chunk, for cross-entropy + z_loss_coef x log²Z."""

    @staticmethod
    def forward(
        ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, z_loss_coef: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
        grad_h_ND = torch.empty_like(h_ND)
        # fp32 across chunks: each chunk's matmul accumulates in fp32, and rounding the running sum to bf16 after
        # every chunk would lose the small contributions of the later ones.
        grad_w_VD = torch.zeros_like(w_VD, dtype=torch.float32)
        total, total_z = (torch.zeros((), dtype=torch.float32, device=h_ND.device) for _ in range(2))
        rows = chunk_rows(w_VD.shape[0])
        for start in range(0, h_ND.shape[0], rows):
            h_CD, t_C = h_ND[start : start + rows], targets_N[start : start + rows]
            nll_C, lse_C, probs_CV = _chunk_nll_lse_and_probs(h_CD, w_VD, t_C)
            valid_C = t_C != IGNORE_INDEX
            total += nll_C.sum()
            total_z += (lse_C.square() * valid_C).sum()
            # d(nll + c log²Z)/d(logits) = softmax * a - onehot with a = 1 + 2c log Z, averaged over the valid rows:
            # written (softmax - onehot / a) * (a / n_valid), so the row factor a rides on the scaling pass that
            # was there anyway. In fp32: in bf16, a confident target's p rounds to 1 and its gradient p - 1 to 0.
            a_C = 1 + 2 * z_loss_coef * lse_C
            probs_CV[torch.arange(len(t_C), device=t_C.device), t_C.clamp(min=0)] -= 1 / a_C
            grad_CV = (probs_CV * (a_C * valid_C / n_valid).unsqueeze(1)).to(h_ND.dtype)
            torch.mm(grad_CV, w_VD, out=grad_h_ND[start : start + rows])
            grad_w_VD += (grad_CV.t() @ h_CD).float()
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype))
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
    """(mean next-token cross-entropy of logits h @ w.T, mean log²Z), over the positions whose target is not -100.

    The cross-entropy's gradient is that of cross-entropy + z_loss_coef x log²Z: the z-loss is trained through it
    while the value stays the plain cross-entropy, the number logged and evaluated. log²Z is for logging (no
    gradient of its own)."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, z_loss_coef)
    n_valid = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
    rows = chunk_rows(w_VD.shape[0])
    total, total_z = 0.0, 0.0
    for s in range(0, h_ND.shape[0], rows):
        t_C = targets_N[s : s + rows]
        nll_C, lse_C, _ = _chunk_nll_lse_and_probs(h_ND[s : s + rows], w_VD, t_C)
        total, total_z = total + nll_C.sum(), total_z + (lse_C.square() * (t_C != IGNORE_INDEX)).sum()
    return total / n_valid, total_z / n_valid
