"""Registry of base losses (docs/methods.md §2): name -> function with one signature.

Every entry is ``fn(x: LossInputs, hp: LossHParams) -> loss_BT`` (per position, zero on masked
positions, never reduced). A trainer looks a name up once with :func:`get_loss` and never branches on
strings. ``LossSpec.needs_support`` says whether the loss needs the student's logits on the teacher's
top-K support (the trainer then gathers them in the chunked LM-head pass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opdkit.losses.divergences import topk_forward_kl, topk_generalized_jsd, topk_reverse_kl
from opdkit.losses.lsm import topk_support_matching
from opdkit.losses.opd import sampled_token_opd
from opdkit.losses.tis import truncated_is_opd


@dataclass
class LossInputs:
    """Response-aligned tensors a base loss may read (B sequences, T positions, K teacher support).

    mask_BT: 1 on valid response tokens. logp_BT: current student log-prob of the sampled token
    (with grad). logp_old_BT: behaviour log-prob (recorded at sampling). logp_teacher_BT: teacher's.
    student_support_logits_BTK / student_lse_BT: student logits on the teacher's top-K ids and its
    log-normaliser (with grad). teacher_support_logits_BTK / teacher_lse_BT: the teacher's.
    advantage_BT: optional advantage replacing ``logp_teacher − logp_old`` in the losses that read one
    (``LossSpec.uses_advantage``): SG-OPD's gated advantage (§5.1) or the recomputed one (§8).
    """

    mask_BT: torch.Tensor
    logp_BT: torch.Tensor
    logp_old_BT: torch.Tensor
    logp_teacher_BT: torch.Tensor
    student_support_logits_BTK: torch.Tensor | None = None
    student_lse_BT: torch.Tensor | None = None
    teacher_support_logits_BTK: torch.Tensor | None = None
    teacher_lse_BT: torch.Tensor | None = None
    advantage_BT: torch.Tensor | None = None


@dataclass(frozen=True)
class LossHParams:
    """Scalar hyper-parameters of the base losses (defaults of docs/methods.md §2)."""

    clip_eps: float = 0.2
    dual_clip: float | None = 3.0
    jsd_beta: float = 0.5
    tail: bool = True
    tis_cap: float = 2.0  # C of opd_tis's truncated IS weight (§8, opdkit extension)


@dataclass(frozen=True)
class LossSpec:
    """A base loss: ``fn``, whether it needs the teacher's top-K support, and whether it reads
    ``LossInputs.advantage_BT`` (only such losses combine with ``loss.advantage`` other than plain)."""

    fn: Callable[[LossInputs, LossHParams], torch.Tensor]
    needs_support: bool
    doc: str
    uses_advantage: bool = False


def _support_logps(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if x.student_support_logits_BTK is None or x.teacher_support_logits_BTK is None:
        raise ValueError("this loss needs the teacher's top-K support (score the rollout with topk > 0)")
    s = x.student_support_logits_BTK.float() - x.student_lse_BT.float()[..., None]
    t = x.teacher_support_logits_BTK.float() - x.teacher_lse_BT.float()[..., None]
    return s, t


def _opd(x: LossInputs, hp: LossHParams) -> torch.Tensor:
    return sampled_token_opd(x.logp_BT, x.logp_old_BT, x.logp_teacher_BT, x.mask_BT, clip_eps=hp.clip_eps,
                             dual_clip=hp.dual_clip, advantage_BT=x.advantage_BT)


def _opd_tis(x: LossInputs, hp: LossHParams) -> torch.Tensor:
    return truncated_is_opd(x.logp_BT, x.logp_old_BT, x.logp_teacher_BT, x.mask_BT, cap=hp.tis_cap,
                            advantage_BT=x.advantage_BT)


def _lsm(x: LossInputs, hp: LossHParams) -> torch.Tensor:
    if x.student_support_logits_BTK is None or x.teacher_support_logits_BTK is None:
        raise ValueError("lsm needs the teacher's top-K support (score the rollout with topk > 0)")
    return topk_support_matching(x.student_support_logits_BTK, x.teacher_support_logits_BTK, x.mask_BT)


def _fkl(x: LossInputs, hp: LossHParams) -> torch.Tensor:
    return topk_forward_kl(*_support_logps(x), x.mask_BT, tail=hp.tail)


def _rkl(x: LossInputs, hp: LossHParams) -> torch.Tensor:
    return topk_reverse_kl(*_support_logps(x), x.mask_BT, tail=hp.tail)


def _jsd(x: LossInputs, hp: LossHParams) -> torch.Tensor:
    return topk_generalized_jsd(*_support_logps(x), x.mask_BT, beta=hp.jsd_beta, tail=hp.tail)


BASE_LOSSES: dict[str, LossSpec] = {
    "opd": LossSpec(_opd, False, "sampled-token OPD, PPO dual-clip surrogate (§2.1)", uses_advantage=True),
    "lsm": LossSpec(_lsm, True, "teacher top-K local support matching (§2.2)"),
    "fkl": LossSpec(_fkl, True, "forward KL on the teacher top-K (+ tail) (§2.3)"),
    "rkl": LossSpec(_rkl, True, "reverse KL on the teacher top-K (+ tail) (§2.3)"),
    "jsd": LossSpec(_jsd, True, "generalized JSD(β) on the teacher top-K (+ tail) (§2.3)"),
    "opd_tis": LossSpec(_opd_tis, False, "sampled-token OPD with a per-token truncated IS weight instead of the "
                                         "PPO clip (§8, opdkit extension)", uses_advantage=True),
}


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; an unknown name raises and lists the valid ones."""
    try:
        return BASE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(BASE_LOSSES)}") from None
