"""Teacher top-K local support matching (LSM): docs/methods.md §2.2 (arXiv 2603.25562).

Axis names: B sequences, T positions, K support (the teacher's top-K ids ``S_t``, gathered by the
caller). The loss is per position ``[B,T]``, multiplied by the mask, never reduced.
"""

from __future__ import annotations

import torch

__all__ = ["topk_support_matching"]


def topk_support_matching(
    student_logits_BTK: torch.Tensor,
    teacher_logits_BTK: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """LSM loss on the teacher's top-K support (§2.2, arXiv 2603.25562).

    ``p̂ = softmax(z_student[S_t])``, ``q̂ = softmax(z_teacher[S_t])`` (both renormalized over the K
    gathered logits with a log-softmax), ``l_t = Σ_{v∈S_t} p̂_v (log p̂_v − log q̂_v) = KL(p̂ ‖ q̂)``.
    The gradient flows through ``p̂`` and ``log p̂``; teacher logits are detached. No importance ratio.
    Terms with ``p̂_v = 0`` (student logit ``-inf``) contribute exactly 0.

    Args:
        student_logits_BTK: ``[B,T,K]`` student logits gathered on ``S_t``.
        teacher_logits_BTK: ``[B,T,K]`` teacher logits on ``S_t`` (constants).
        mask_BT: optional ``[B,T]`` mask (nonzero = valid); ``None`` means no masking.

    Returns:
        ``loss_BT`` ``[B,T]``, ``>= 0``; times ``mask_BT`` and exactly 0 where ``mask_BT == 0``.
        Computed in float32 (float64 inputs stay float64).
    """
    if student_logits_BTK.shape != teacher_logits_BTK.shape:
        shapes = (tuple(student_logits_BTK.shape), tuple(teacher_logits_BTK.shape))
        raise ValueError(f"shape mismatch: {shapes[0]} vs {shapes[1]}")
    if mask_BT is not None and tuple(mask_BT.shape) != tuple(student_logits_BTK.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask_BT.shape)} != {tuple(student_logits_BTK.shape[:-1])}")
    dtype = torch.promote_types(
        torch.promote_types(torch.float32, student_logits_BTK.dtype), teacher_logits_BTK.dtype
    )
    zs_BTK = student_logits_BTK.to(dtype)
    zq_BTK = teacher_logits_BTK.detach().to(dtype)
    if mask_BT is not None:
        valid_BT = mask_BT != 0
        zs_BTK = torch.where(valid_BT[..., None], zs_BTK, 0.0)
        zq_BTK = torch.where(valid_BT[..., None], zq_BTK, 0.0)

    logp_BTK = torch.log_softmax(zs_BTK, dim=-1)
    logq_BTK = torch.log_softmax(zq_BTK, dim=-1)
    # 0 * log 0 = 0: select the log-ratio before multiplying so no nan reaches forward or backward.
    diff_BTK = torch.where(logp_BTK == float("-inf"), 0.0, logp_BTK - logq_BTK)
    loss_BT = (logp_BTK.exp() * diff_BTK).sum(dim=-1)
    if mask_BT is None:
        return loss_BT
    weighted_BT = loss_BT * torch.where(valid_BT, mask_BT.to(dtype), 0.0)
    return torch.where(valid_BT, weighted_BT, 0.0)
