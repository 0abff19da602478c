"""Token-level truncated importance sampling for OPD (docs/methods.md §8; control, **opdkit extension**).

The rollout-correction form of verl ("bypass" mode, pure IS, token aggregation): the behaviour policy
that sampled the rollout is also the reference of the ratio, the ratio is truncated per token and
detached, and there is no PPO clip. Axis names: B sequences, T positions.

    A_t = sg(lq_t − lp_old_t)                  (or a given advantage, e.g. SG-OPD §5.1 / recomputed §8)
    w_t = sg(min(exp(lp_t − lp_old_t), C))     truncated per-token IS weight, C = ``cap``
    l_t = −w_t · A_t · exp(lp_t − sg(lp_t))

The last factor is 1 in value and has gradient ``∇lp_t``, so ``l_t = −w_t·A_t`` (the truncated IS
surrogate) and ``∇l_t = −w_t·A_t·∇lp_t`` (off-policy REINFORCE with truncated weights). At
``lp = lp_old`` (and ``C ≥ 1``) value and gradient equal those of §2.1's OPD loss. The ratio enters only
through ``w_t``, computed as ``exp(min(lp − lp_old, log C))``, so it cannot overflow.
"""

from __future__ import annotations

import math

import torch

from opdkit.losses.opd import _apply_mask, _check_shapes, _clean, _compute_dtype, _valid, surrogate_inputs

__all__ = ["tis_weight", "truncated_is_opd"]


def tis_weight(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor, *,
               cap: float = 2.0) -> torch.Tensor:
    """Truncated per-token IS weight ``w_t = min(exp(lp_t − lp_old_t), C)`` (§8, opdkit extension).

    Shapes: ``logp_BT`` (current student), ``logp_old_BT`` (behaviour), ``mask_BT`` all [B,T]
    → ``w_BT`` [B,T], detached, in ``[0, C]``, exactly 0 where ``mask_BT == 0``.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    _check_shapes(logp_BT=logp_BT, logp_old_BT=logp_old_BT, mask_BT=mask_BT)
    dtype = _compute_dtype(logp_BT, logp_old_BT)
    valid_BT = _valid(mask_BT)
    log_r_BT = _clean(logp_BT.detach(), valid_BT, dtype) - _clean(logp_old_BT.detach(), valid_BT, dtype)
    w_BT = torch.exp(torch.clamp(log_r_BT, max=math.log(cap)))
    return torch.where(valid_BT, w_BT, torch.zeros((), dtype=dtype, device=w_BT.device))


def truncated_is_opd(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, logp_teacher_BT: torch.Tensor | None,
                     mask_BT: torch.Tensor, *, cap: float = 2.0,
                     advantage_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token OPD loss with a truncated IS weight instead of the PPO clip (module docstring, §8).

    Args:
        logp_BT: ``[B,T]`` current-student log-prob of the sampled token ``lp_t`` (carries the gradient).
        logp_old_BT: ``[B,T]`` behaviour log-prob ``lp_old_t`` (detached).
        logp_teacher_BT: ``[B,T]`` teacher log-prob ``lq_t``; may be ``None`` if ``advantage_BT`` is given.
        mask_BT: ``[B,T]`` response mask (nonzero = valid; the loss is multiplied by it).
        cap: truncation ``C`` of the ratio (verl's rollout-correction default threshold: 2).
        advantage_BT: optional ``[B,T]`` advantage replacing ``A`` (detached).

    Returns:
        ``loss_BT`` ``[B,T]``: ``−w_t·A_t`` in value, gradient ``−w_t·A_t·∇lp_t``; exactly 0 where
        ``mask_BT == 0``. Not reduced.
    """
    adv_BT, valid_BT, dtype = surrogate_inputs(logp_BT, logp_old_BT, logp_teacher_BT, mask_BT, advantage_BT)
    w_BT = tis_weight(logp_BT, logp_old_BT, mask_BT, cap=cap).to(dtype)
    lp_BT = _clean(logp_BT, valid_BT, dtype)
    score_BT = torch.exp(lp_BT - lp_BT.detach())  # 1 in value, ∇lp in gradient
    return _apply_mask(-w_BT * adv_BT * score_BT, mask_BT, valid_BT)
