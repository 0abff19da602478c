"""LSM as a verl logits processor (§2.2): student logits on the teacher's top-K ids, renormalised.

verl's top-K path calls the loss function with ``student_logits`` (``(1, total_nnz, V)``, packed ``thd``)
and hard-wires forward KL for it (``compute_topk_loss``). :func:`with_opdkit_logits` wraps the actor's loss
function so that, for ``loss_mode=opdkit_lsm``, that call returns opdkit's per-token LSM instead; the
registered loss (:func:`opdkit.integrations.verl.losses.opdkit_lsm`) reads it back from ``model_output``.
Teacher log-probs normalised over the full vocabulary equal teacher logits up to a per-position constant,
which LSM's log-softmax over the K support removes.
"""

from __future__ import annotations

import functools

import torch

from opdkit.integrations.verl.guards import VerlIntegrationError
from opdkit.losses.lsm import topk_support_matching


def lsm_from_logits(student_logits_1NV: torch.Tensor, data, data_format: str = "thd") -> dict[str, torch.Tensor]:
    """Per-token LSM ``(1, N)`` from packed student logits and the nested teacher top-K of ``data``."""
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size

    if data_format != "thd":
        raise VerlIntegrationError(f"opdkit_lsm supports the packed 'thd' layout only, got {data_format!r}")
    if get_ulysses_sequence_parallel_world_size() > 1:
        raise VerlIntegrationError("opdkit_lsm does not support Ulysses sequence parallelism "
                                   "(actor_rollout_ref.actor.ulysses_sequence_parallel_size must be 1)")
    ids, lq = data["teacher_ids"], data["teacher_logprobs"]
    if not (ids.is_nested and lq.is_nested):
        raise VerlIntegrationError("opdkit_lsm expects nested teacher_ids / teacher_logprobs (verl's no-padding mode)")
    ids_1NK, lq_1NK = ids.values().unsqueeze(0).long(), lq.values().unsqueeze(0)
    if ids_1NK.shape[:2] != student_logits_1NV.shape[:2]:
        raise ValueError(f"teacher top-K {tuple(ids_1NK.shape)} does not align with student logits "
                         f"{tuple(student_logits_1NV.shape)}")
    zs_1NK = torch.gather(student_logits_1NV, dim=-1, index=ids_1NK)
    return {"opdkit_lsm": topk_support_matching(zs_1NK, lq_1NK)}


def with_opdkit_logits(loss_function):
    """Wrap verl's actor loss (``partial(distillation_ppo_loss, config=, distillation_config=)``) for LSM."""
    kwargs = getattr(loss_function, "keywords", None) or {}
    dcfg = kwargs.get("distillation_config")
    if dcfg is None or dcfg.distillation_loss.loss_mode != "opdkit_lsm":
        return loss_function

    @functools.wraps(loss_function)
    def wrapped(*args, student_logits=None, data_format="thd", **kw):
        if student_logits is not None:
            return lsm_from_logits(student_logits, kw["data"], data_format)
        return loss_function(*args, **kw)

    return wrapped
