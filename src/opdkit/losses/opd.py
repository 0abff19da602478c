"""Sampled-token on-policy distillation (OPD) loss: docs/methods.md §2.1 (arXiv 2603.25562).

Axis names: B sequences, T positions. Every loss returns per-position values ``[B,T]`` that are
already multiplied by ``mask_BT`` and exactly zero where the mask is zero (even if the inputs there
are inf / nan). Nothing here reduces or divides by a token count; reduction is §3's job.

Precision: inputs in half / bfloat16 are upcast to float32; float32 and float64 inputs keep their
dtype (float64 is used by the tests' references).
"""

from __future__ import annotations

import torch

__all__ = ["opd_advantage", "sampled_token_opd", "clip_fraction"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32; float64 if any input is float64."""
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype) if x.is_floating_point() else dtype
    return dtype


def _valid(mask_BT: torch.Tensor) -> torch.Tensor:
    return mask_BT != 0


def _clean(x_BT: torch.Tensor, valid_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast and replace masked entries by 0 (torch.where, so garbage there never reaches exp/grad)."""
    x_BT = x_BT.to(dtype)
    return torch.where(valid_BT, x_BT, torch.zeros((), dtype=dtype, device=x_BT.device))


def _apply_mask(loss_BT: torch.Tensor, mask_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    weighted_BT = loss_BT * torch.where(valid_BT, mask_BT.to(loss_BT.dtype), 0.0)
    return torch.where(valid_BT, weighted_BT, torch.zeros((), dtype=loss_BT.dtype, device=loss_BT.device))


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def opd_advantage(
    logp_teacher_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Per-token OPD advantage ``A_t = sg(lq_t - lp_old_t)`` (§2.1, arXiv 2603.25562).

    Args:
        logp_teacher_BT: ``[B,T]`` teacher log-prob of the sampled token, ``lq_t``.
        logp_old_BT: ``[B,T]`` behaviour-student log-prob recorded at sampling time, ``lp_old_t``.
        mask_BT: ``[B,T]`` response mask (nonzero = valid).

    Returns:
        ``A_BT`` ``[B,T]``, detached, no normalization / discount, exactly 0 where ``mask_BT == 0``.
    """
    _check_shapes(logp_teacher_BT=logp_teacher_BT, logp_old_BT=logp_old_BT, mask_BT=mask_BT)
    dtype = _compute_dtype(logp_teacher_BT, logp_old_BT)
    valid_BT = _valid(mask_BT)
    lq_BT = _clean(logp_teacher_BT.detach(), valid_BT, dtype)
    lp_old_BT = _clean(logp_old_BT.detach(), valid_BT, dtype)
    return torch.where(valid_BT, lq_BT - lp_old_BT, torch.zeros((), dtype=dtype, device=lq_BT.device))


def surrogate_inputs(logp_BT, logp_old_BT, logp_teacher_BT, mask_BT, advantage_BT):
    """Checked inputs of a sampled-token surrogate: ``(A_BT, valid_BT, dtype)``.

    ``A_BT`` is ``advantage_BT`` (detached, 0 where invalid) when given, else
    :func:`opd_advantage` ``= log q - log pi_old``; one of the two is required. ``dtype`` is the compute
    dtype of ``logp_BT`` / ``logp_old_BT``; ``valid_BT`` the finite, unmasked positions.
    """
    if advantage_BT is None and logp_teacher_BT is None:
        raise ValueError("give logp_teacher_BT or advantage_BT")
    _check_shapes(logp_BT=logp_BT, logp_old_BT=logp_old_BT, logp_teacher_BT=logp_teacher_BT, mask_BT=mask_BT,
                  advantage_BT=advantage_BT)
    dtype = _compute_dtype(logp_BT, logp_old_BT)
    valid_BT = _valid(mask_BT)
    if advantage_BT is None:
        return opd_advantage(logp_teacher_BT, logp_old_BT, mask_BT).to(dtype), valid_BT, dtype
    return _clean(advantage_BT.detach(), valid_BT, dtype), valid_BT, dtype


def sampled_token_opd(
    logp_BT: torch.Tensor,
    logp_old_BT: torch.Tensor,
    logp_teacher_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    advantage_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled-token OPD: PPO clipped surrogate with dual clip (§2.1, arXiv 2603.25562).

    ``A_t = sg(lq_t - lp_old_t)`` (or ``advantage_BT.detach()`` when given, e.g. SG-OPD's ``A'``, §5.1),
    ``r_t = exp(lp_t - lp_old_t)``,
    ``l_t = max(-A_t r_t, -A_t clip(r_t, 1-eps, 1+eps))``, and where ``A_t < 0``:
    ``l_t = min(l_t, -c A_t)`` with ``c = dual_clip`` (``None`` disables the dual clip).

    At ``lp = lp_old`` the expected gradient over ``y ~ pi_old`` equals the per-token reverse-KL
    gradient ``d KL(pi || q) / d theta``. ``lp_old`` is treated as a constant.

    Args:
        logp_BT: ``[B,T]`` current-student log-prob of the sampled token ``lp_t`` (carries the gradient).
        logp_old_BT: ``[B,T]`` behaviour-student log-prob ``lp_old_t`` (detached here).
        logp_teacher_BT: ``[B,T]`` teacher log-prob ``lq_t``; may be ``None`` if ``advantage_BT`` is given.
        mask_BT: ``[B,T]`` response mask (nonzero = valid; the loss is multiplied by it).
        clip_eps: ``eps`` of the PPO clip.
        dual_clip: ``c`` of the dual clip (must be > 1), or ``None``.
        advantage_BT: optional ``[B,T]`` advantage replacing ``A`` (detached).

    Returns:
        ``loss_BT`` ``[B,T]`` per-position loss times ``mask_BT``; exactly 0 where ``mask_BT == 0``.
    """
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    adv_BT, valid_BT, dtype = surrogate_inputs(logp_BT, logp_old_BT, logp_teacher_BT, mask_BT, advantage_BT)

    lp_BT = _clean(logp_BT, valid_BT, dtype)
    lp_old_BT = _clean(logp_old_BT.detach(), valid_BT, dtype)
    ratio_BT = torch.exp(lp_BT - lp_old_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    if dual_clip is not None:
        loss_BT = torch.where(adv_BT < 0, torch.minimum(loss_BT, -dual_clip * adv_BT), loss_BT)
    return _apply_mask(loss_BT, mask_BT, valid_BT)


@torch.no_grad()
def clip_fraction(
    logp_BT: torch.Tensor,
    logp_old_BT: torch.Tensor,
    advantage_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Per-token indicator that the PPO clipped branch of §2.1 is active (telemetry, arXiv 2603.25562).

    ``1`` where ``-A clip(r, 1-eps, 1+eps) > -A r`` strictly (i.e. ``A>0, r>1+eps`` or ``A<0, r<1-eps``;
    the gradient is zero there), else ``0``. The dual-clip cap is not counted. Not divided by a count.

    Args:
        logp_BT, logp_old_BT: ``[B,T]`` current / behaviour log-probs of the sampled token.
        advantage_BT: ``[B,T]`` advantage ``A`` (e.g. from :func:`opd_advantage`).
        mask_BT: ``[B,T]`` response mask.
        clip_eps: ``eps`` of the PPO clip.

    Returns:
        ``[B,T]`` float 0/1 tensor, 0 where ``mask_BT == 0``; no gradient.
    """
    _check_shapes(logp_BT=logp_BT, logp_old_BT=logp_old_BT, advantage_BT=advantage_BT, mask_BT=mask_BT)
    dtype = _compute_dtype(logp_BT, logp_old_BT, advantage_BT)
    valid_BT = _valid(mask_BT)
    adv_BT = _clean(advantage_BT, valid_BT, dtype)
    ratio_BT = torch.exp(_clean(logp_BT, valid_BT, dtype) - _clean(logp_old_BT, valid_BT, dtype))
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    active_BT = valid_BT & (clipped_BT > unclipped_BT)
    return active_BT.to(dtype)
