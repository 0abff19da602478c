"""Per-position divergences between student ``p`` and teacher ``q``: docs/methods.md §2.3.

Forward KL ``KL(q‖p)``, reverse KL ``KL(p‖q)`` and the generalized JSD of GKD (arXiv 2306.13649),
either on the full vocabulary (inputs: logits ``[B,T,V]``) or on a top-K support (inputs: log-probs
``[B,T,K]`` normalized over the full vocabulary and gathered on the K support ids).

Axis names: B sequences, T positions, V vocabulary, K support. Every function returns ``[B,T]``,
multiplied by ``mask_BT`` (if given) and exactly 0 where ``mask_BT == 0`` even if the inputs there are
inf / nan; nothing is reduced. Teacher inputs are constants (detached). Computation is in float32
(float64 inputs stay float64). Terms with zero probability (log-prob ``-inf``) contribute exactly 0
(``0 log 0 = 0``), with no nan in forward or backward.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "topk_forward_kl",
    "topk_reverse_kl",
    "topk_generalized_jsd",
]

NEG_INF = float("-inf")
# Smallest tail mass of the (K+1)-th bucket: keeps log(tail) finite when the K gathered probabilities
# sum to 1 (or slightly above, by rounding), so KL terms never become inf/nan because of rounding.
TAIL_FLOOR = 1e-12


# ---------------------------------------------------------------- helpers (log-prob inputs, last axis)
def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _kl_logp(logp_a_BTN: torch.Tensor, logp_b_BTN: torch.Tensor) -> torch.Tensor:
    """``KL(a‖b) = Σ_N a (log a − log b)`` over the last axis, with ``0 log 0 = 0``. Returns ``[B,T]``."""
    diff_BTN = torch.where(logp_a_BTN == NEG_INF, 0.0, logp_a_BTN - logp_b_BTN)
    return (logp_a_BTN.exp() * diff_BTN).sum(dim=-1)


def _jsd_logp(logp_p_BTN: torch.Tensor, logp_q_BTN: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD with GKD/TRL's convention; ``p`` student, ``q`` teacher. Returns ``[B,T]``.

    ``beta == 0`` -> ``KL(q‖p)``; ``beta == 1`` -> ``KL(p‖q)``; otherwise
    ``m = beta q + (1−beta) p`` (in log space with logaddexp) and
    ``JSD_beta = beta KL(q‖m) + (1−beta) KL(p‖m)``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl_logp(logp_q_BTN, logp_p_BTN)
    if beta == 1.0:
        return _kl_logp(logp_p_BTN, logp_q_BTN)
    # Where both log-probs are -inf the mixture is -inf too; feed 0 there so logaddexp's backward is
    # finite (those entries are excluded from both KL sums by _kl_logp anyway).
    both_zero_BTN = (logp_p_BTN == NEG_INF) & (logp_q_BTN == NEG_INF)
    lp_BTN = torch.where(both_zero_BTN, 0.0, logp_p_BTN)
    lq_BTN = torch.where(both_zero_BTN, 0.0, logp_q_BTN)
    logm_BTN = torch.logaddexp(lp_BTN + math.log1p(-beta), lq_BTN + math.log(beta))
    return beta * _kl_logp(logp_q_BTN, logm_BTN) + (1.0 - beta) * _kl_logp(logp_p_BTN, logm_BTN)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of ``−log 2`` (Mächler 2012).

    Each branch gets a clamped input so the branch that is not selected stays finite (no nan grads).
    """
    near0 = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.clamp(x, min=-math.log(2.0))))
    b = torch.log1p(-torch.exp(torch.clamp(x, max=-math.log(2.0))))
    return torch.where(near0, a, b)


def _support_logp(logp_BTK: torch.Tensor, tail: bool) -> torch.Tensor:
    """Distribution on the support: ``[B,T,K+1]`` with a tail bucket, or ``[B,T,K]`` renormalized."""
    if not tail:
        return torch.log_softmax(logp_BTK, dim=-1)
    lse_BT1 = torch.logsumexp(logp_BTK, dim=-1, keepdim=True)
    lse_BT1 = torch.clamp(lse_BT1, max=math.log1p(-TAIL_FLOOR))  # tail mass >= TAIL_FLOOR
    return torch.cat([logp_BTK, _log1mexp(lse_BT1)], dim=-1)


def _prepare(
    student_BTN: torch.Tensor, teacher_BTN: torch.Tensor, mask_BT: torch.Tensor | None, fill: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if student_BTN.shape != teacher_BTN.shape:
        raise ValueError(f"shape mismatch: {tuple(student_BTN.shape)} vs {tuple(teacher_BTN.shape)}")
    if mask_BT is not None and tuple(mask_BT.shape) != tuple(student_BTN.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask_BT.shape)} != {tuple(student_BTN.shape[:-1])}")
    dtype = _dtype(student_BTN, teacher_BTN)
    s_BTN = student_BTN.to(dtype)
    t_BTN = teacher_BTN.detach().to(dtype)
    valid_BT = None
    if mask_BT is not None:
        valid_BT = mask_BT != 0
        s_BTN = torch.where(valid_BT[..., None], s_BTN, fill)
        t_BTN = torch.where(valid_BT[..., None], t_BTN, fill)
    return s_BTN, t_BTN, valid_BT


def _finish(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor | None, valid_BT: torch.Tensor | None
) -> torch.Tensor:
    if mask_BT is None:
        return loss_BT
    weighted_BT = loss_BT * torch.where(valid_BT, mask_BT.to(loss_BT.dtype), 0.0)
    return torch.where(valid_BT, weighted_BT, 0.0)


# ---------------------------------------------------------------- full vocabulary (logit inputs)
def _full(student_logits_BTV, teacher_logits_BTV, mask_BT, fn) -> torch.Tensor:
    zs_BTV, zq_BTV, valid_BT = _prepare(student_logits_BTV, teacher_logits_BTV, mask_BT, 0.0)
    loss_BT = fn(torch.log_softmax(zs_BTV, dim=-1), torch.log_softmax(zq_BTV, dim=-1))
    return _finish(loss_BT, mask_BT, valid_BT)


def forward_kl(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward KL ``KL(q‖p) = Σ_V q (log q − log p)`` per position (§2.3; GKD arXiv 2306.13649).

    ``p = softmax(student_logits_BTV)``, ``q = softmax(teacher_logits_BTV)`` (teacher detached).
    Inputs ``[B,T,V]``, optional ``mask_BT`` ``[B,T]``; returns ``[B,T]``.
    """
    return _full(student_logits_BTV, teacher_logits_BTV, mask_BT, lambda lp, lq: _kl_logp(lq, lp))


def reverse_kl(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Reverse KL ``KL(p‖q) = Σ_V p (log p − log q)`` per position (§2.3; GKD arXiv 2306.13649).

    ``p = softmax(student_logits_BTV)``, ``q = softmax(teacher_logits_BTV)`` (teacher detached).
    Inputs ``[B,T,V]``, optional ``mask_BT`` ``[B,T]``; returns ``[B,T]``.
    """
    return _full(student_logits_BTV, teacher_logits_BTV, mask_BT, lambda lp, lq: _kl_logp(lp, lq))


def generalized_jsd(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized JSD per position (§2.3; GKD arXiv 2306.13649, TRL ``generalized_jsd_loss``).

    Mixture ``m = beta·q + (1−beta)·p`` (teacher weighted by ``beta``, student by ``1−beta``; this is
    §2.3's text and TRL's GKDTrainer convention), ``JSD_beta = beta·KL(q‖m) + (1−beta)·KL(p‖m)``,
    a proper divergence (``>= 0``, ``= 0`` iff ``p = q``; symmetric at ``beta = 0.5``).

    Endpoints: that formula is 0 at ``beta = 0`` and ``beta = 1`` (``m`` equals one side), so, like
    TRL, the endpoints are defined explicitly: ``beta == 0`` -> forward ``KL(q‖p)``, ``beta == 1`` ->
    reverse ``KL(p‖q)``. The interior is consistent with them up to scale:
    ``JSD_beta / beta -> KL(q‖p)`` as ``beta -> 0`` and ``JSD_beta / (1−beta) -> KL(p‖q)`` as
    ``beta -> 1``; the value itself therefore jumps at the two endpoints (as in TRL).

    Inputs ``[B,T,V]`` logits, optional ``mask_BT`` ``[B,T]``; returns ``[B,T]``.
    """
    return _full(student_logits_BTV, teacher_logits_BTV, mask_BT, lambda lp, lq: _jsd_logp(lp, lq, beta))


# ---------------------------------------------------------------- top-K support (log-prob inputs)
_TOPK_DOC = """

    Inputs: ``student_logp_BTK`` / ``teacher_logp_BTK`` ``[B,T,K]`` log-probabilities normalized over the
    full vocabulary, gathered on the same K support ids (e.g. the teacher's top-K ``S_t``); teacher
    detached. Optional ``mask_BT`` ``[B,T]``. Returns ``[B,T]``.

    ``tail=True`` (default): a (K+1)-th bucket holds the remaining mass of each side,
    ``log(1 − Σ_K exp(logp_K))``, computed as log1mexp(logsumexp) (stable on both sides of
    ``−log 2``); the sum is clamped so the tail mass is at least ``TAIL_FLOOR = 1e-12`` (rounding can
    make the K probabilities sum to 1 or slightly above). The divergence is then the exact divergence
    between the two coarse-grained (K+1)-bucket distributions, a lower bound on the full-vocabulary one.
    ``tail=False``: both sides are renormalized over the K ids (log-softmax), as in LSM (§2.2).
    """


def topk_forward_kl(
    student_logp_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    tail: bool = True,
) -> torch.Tensor:
    """Forward KL ``KL(q‖p)`` on a top-K support (§2.3; GKD arXiv 2306.13649)."""
    fill = -math.log(student_logp_BTK.shape[-1] + 1)
    lp_BTK, lq_BTK, valid_BT = _prepare(student_logp_BTK, teacher_logp_BTK, mask_BT, fill)
    loss_BT = _kl_logp(_support_logp(lq_BTK, tail), _support_logp(lp_BTK, tail))
    return _finish(loss_BT, mask_BT, valid_BT)


def topk_reverse_kl(
    student_logp_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    tail: bool = True,
) -> torch.Tensor:
    """Reverse KL ``KL(p‖q)`` on a top-K support (§2.3; GKD arXiv 2306.13649)."""
    fill = -math.log(student_logp_BTK.shape[-1] + 1)
    lp_BTK, lq_BTK, valid_BT = _prepare(student_logp_BTK, teacher_logp_BTK, mask_BT, fill)
    loss_BT = _kl_logp(_support_logp(lp_BTK, tail), _support_logp(lq_BTK, tail))
    return _finish(loss_BT, mask_BT, valid_BT)


def topk_generalized_jsd(
    student_logp_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    tail: bool = True,
) -> torch.Tensor:
    """Generalized JSD on a top-K support (§2.3; GKD arXiv 2306.13649); same ``beta`` convention,
    mixture ``m = beta·q + (1−beta)·p`` and endpoints as :func:`generalized_jsd`."""
    fill = -math.log(student_logp_BTK.shape[-1] + 1)
    lp_BTK, lq_BTK, valid_BT = _prepare(student_logp_BTK, teacher_logp_BTK, mask_BT, fill)
    loss_BT = _jsd_logp(_support_logp(lp_BTK, tail), _support_logp(lq_BTK, tail), beta)
    return _finish(loss_BT, mask_BT, valid_BT)


for _fn in (topk_forward_kl, topk_reverse_kl, topk_generalized_jsd):
    _fn.__doc__ = (_fn.__doc__ or "") + _TOPK_DOC
