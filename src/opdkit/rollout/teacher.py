"""Teacher scoring: the teacher's log-prob and top-K at every sampled position (docs/methods.md §0, §2.1, §2.2).

:func:`score_with_teacher` runs the teacher over prompt + response in micro-batches of rows (rows of
similar length together, so little padding is computed), with :func:`response_logprobs` applying the LM
head in chunks (no ``[B,T,V]`` float32 tensor). It fills, as float32 on the batch's device:

- ``teacher_logp_BT``: ``lq_t = log q(y_t | c_t)`` at temperature 1 (OPD advantage, §2.1);
- ``teacher_lse_BT``: the log-normaliser of the teacher logits;
- ``teacher_topk_ids_BTK`` / ``teacher_topk_logits_BTK``: the teacher's top-K support ``S_t`` and raw
  logits on it (LSM, §2.2; K = 32 in the paper).

From a bf16 teacher the logits are float32 products of its bf16 hidden states and head (never rounded
to bf16 before the log-softmax or the top-K; see :mod:`opdkit.losses.logprobs`).

Padding positions hold 0 (ids 0). With ``vocab_limit`` the teacher distribution is restricted to the
first ids, e.g. the value :func:`opdkit.rollout.preflight.check_tokenizers` returns when the teacher's
embedding is padded beyond the student's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.scoring import decoder_and_head, response_logprobs


def score_with_teacher(teacher, batch: RolloutBatch, *, topk: int = 32, microbatch_size: int = 8,
                       chunk_size: int = 1024, vocab_limit: int | None = None,
                       prompts: list[list[int]] | None = None) -> RolloutBatch:
    """Return a copy of ``batch`` with the teacher fields filled (see the module docstring).

    Args:
        teacher: causal LM with a bias-free LM head, on any device / dtype (tensors are moved to it).
        batch: a :class:`RolloutBatch` (B rows, T response columns).
        topk: K for ``teacher_topk_*`` (>= 1, at most the scored vocabulary), or 0 to skip them (None).
        microbatch_size: rows per teacher forward (>= 1).
        chunk_size: positions per LM-head chunk (peak memory ~ ``2 * chunk_size * V * 4`` bytes).
        vocab_limit: score on the first ``vocab_limit`` ids only (None: the teacher's whole head).
        prompts: the teacher's prompt per row (its context, :func:`with_prompts`); None: the student's prompts.
            Only the scoring sees them: the returned batch keeps the student's prompts.

    Raises ValueError when a response token is outside the scored vocabulary (the teacher could not
    score it; run :func:`opdkit.rollout.preflight.check_tokenizers` first).
    """
    _, weight_VH = decoder_and_head(teacher)
    student_batch = batch
    if prompts is not None:
        batch = with_prompts(batch, prompts)
    _check_inputs(teacher, batch, weight_VH.shape[0], topk=topk, microbatch_size=microbatch_size,
                  vocab_limit=vocab_limit)

    B, T = batch.response_ids_BT.shape
    out_dev, dev = batch.response_ids_BT.device, weight_VH.device
    logp_BT = torch.zeros(B, T, dtype=torch.float32, device=out_dev)
    lse_BT = torch.zeros_like(logp_BT)
    top_ids_BTK = torch.zeros(B, T, topk, dtype=torch.long, device=out_dev) if topk else None
    top_logits_BTK = torch.zeros(B, T, topk, dtype=torch.float32, device=out_dev) if topk else None

    # Rows of similar total length share a micro-batch (select() trims the common padding).
    lengths_B = batch.prompt_mask_BP.sum(dim=1) + batch.response_mask_BT.sum(dim=1)
    order = torch.argsort(lengths_B.cpu(), stable=True).tolist()
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for s in range(0, B, microbatch_size):
                rows = order[s:s + microbatch_size]
                sub = _minimal(batch).select(rows).to(dev)
                t = sub.response_ids_BT.shape[1]
                if t == 0:
                    continue
                out = response_logprobs(teacher, sub, topk=topk, chunk_size=chunk_size, vocab_limit=vocab_limit)
                m_bt = sub.response_mask_BT.bool()
                idx = torch.as_tensor(rows, device=out_dev)
                logp_BT[idx, :t] = torch.where(m_bt, out.logp_BT, 0.0).to(out_dev)
                lse_BT[idx, :t] = torch.where(m_bt, out.lse_BT, 0.0).to(out_dev)
                if topk:
                    top_ids_BTK[idx, :t] = torch.where(m_bt[..., None], out.topk_ids_BTK, 0).to(out_dev)
                    top_logits_BTK[idx, :t] = torch.where(m_bt[..., None], out.topk_logits_BTK, 0.0).to(out_dev)
    finally:
        teacher.train(was_training)
    return replace(student_batch, teacher_logp_BT=logp_BT, teacher_lse_BT=lse_BT, teacher_topk_ids_BTK=top_ids_BTK,
                   teacher_topk_logits_BTK=top_logits_BTK)


def _check_inputs(teacher, batch: RolloutBatch, head_rows: int, *, topk: int, microbatch_size: int,
                  vocab_limit: int | None) -> None:
    """One ValueError that names the bad argument, before any forward (:func:`score_with_teacher`)."""
    V = head_rows if vocab_limit is None else int(vocab_limit)
    if not 1 <= V <= head_rows:
        raise ValueError(f"vocab_limit must be in [1, {head_rows}] (the teacher head), got {vocab_limit}")
    if not 0 <= topk <= V:
        raise ValueError(f"topk must be in [0, {V}] (the scored vocabulary), got {topk}")
    if microbatch_size < 1:
        raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}")
    mask_BT = batch.response_mask_BT.bool()
    if batch.size and bool(mask_BT.any()):
        hi = int(batch.response_ids_BT[mask_BT].max())
        if hi >= V:
            raise ValueError(f"response token id {hi} is outside the teacher's scored vocabulary [0, {V}); "
                             "student and teacher vocabularies differ (see opdkit.rollout.preflight)")
    n_emb = teacher.get_input_embeddings().weight.shape[0]
    if batch.size and int(batch.input_ids().max()) >= n_emb:
        raise ValueError(f"a prompt / padding token id ({int(batch.input_ids().max())}) is outside the "
                         f"teacher's embedding [0, {n_emb})")


def _minimal(batch: RolloutBatch) -> RolloutBatch:
    """Only the fields a forward needs (so ``select`` / ``to`` copy nothing else)."""
    return RolloutBatch(prompt_ids_BP=batch.prompt_ids_BP, prompt_mask_BP=batch.prompt_mask_BP,
                        response_ids_BT=batch.response_ids_BT, response_mask_BT=batch.response_mask_BT,
                        logp_old_BT=batch.logp_old_BT, group_ids_B=batch.group_ids_B,
                        prompt_index_B=batch.prompt_index_B)


def with_prompts(batch: RolloutBatch, prompts: list[list[int]], pad_token_id: int = 0) -> RolloutBatch:
    """``batch`` with row ``b``'s prompt replaced by ``prompts[b]`` (left-padded to the longest), same responses.

    The teacher's prompt (its context) may be longer or shorter than the student's. Left padding keeps the
    layout of :class:`RolloutBatch`: response token ``t`` of every row is still predicted at column
    ``P' − 1 + t`` and position ids restart after each row's own padding, so the teacher's log-probs stay
    aligned with the student's tokens row by row (tested against unpadded single rows).
    """
    if len(prompts) != batch.size:
        raise ValueError(f"with_prompts: {len(prompts)} prompts for a batch of {batch.size} rows")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("with_prompts: every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    dev = batch.prompt_ids_BP.device
    ids_BP = torch.full((batch.size, P), int(pad_token_id), dtype=torch.long, device=dev)
    mask_BP = torch.zeros(batch.size, P, dtype=batch.prompt_mask_BP.dtype, device=dev)
    for b, p in enumerate(prompts):
        ids_BP[b, P - len(p):] = torch.as_tensor(p, dtype=torch.long, device=dev)
        mask_BP[b, P - len(p):] = 1
    return replace(batch, prompt_ids_BP=ids_BP, prompt_mask_BP=mask_BP)
