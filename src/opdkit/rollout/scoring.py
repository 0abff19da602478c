"""One forward pass over prompt + response returning the response's log-probs (docs/methods.md §0).

Used for the current student (with gradient) in the trainer, for the teacher (no grad, with top-K)
in teacher scoring, and by tests that compare against the sampler's behaviour log-probs. The LM head
is applied by :func:`opdkit.losses.logprobs.fused_logprobs` in chunks, so no ``[B,T,V]`` float32
tensor is ever built.
"""

from __future__ import annotations

import torch

from opdkit.losses.logprobs import LogprobOutput, fused_logprobs
from opdkit.rollout.batch import RolloutBatch


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder stack (returns final normed hidden states) and LM head weight of a causal LM.

    Works for plain transformers models and PEFT-wrapped ones (``get_decoder`` forwards through).
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError("opdkit needs a causal LM with a bias-free linear LM head (Qwen3, Llama, ...)")
    return model.get_decoder(), head.weight


def response_hidden_states(model, batch: RolloutBatch) -> torch.Tensor:
    """Hidden states ``[B,T,H]`` that predict each response position (column ``P − 1 + t``)."""
    decoder, _ = decoder_and_head(model)
    P, T = batch.prompt_ids_BP.shape[1], batch.response_ids_BT.shape[1]
    out = decoder(input_ids=batch.input_ids()[:, : P + T - 1], attention_mask=batch.attention_mask()[:, : P + T - 1],
                  position_ids=batch.position_ids()[:, : P + T - 1], use_cache=False)
    return out.last_hidden_state[:, P - 1: P - 1 + T]


def response_logprobs(model, batch: RolloutBatch, *, gather_ids_BTK: torch.Tensor | None = None,
                      topk: int = 0, chunk_size: int = 1024, temperature: float = 1.0,
                      vocab_limit: int | None = None) -> LogprobOutput:
    """Log-probs of ``batch.response_ids_BT`` under ``model`` (float32), plus optional top-K / gather.

    Gradients flow to the model when grad mode is on. Values on padding positions are meaningless
    (finite); mask them with ``batch.response_mask_BT``. ``vocab_limit`` restricts the distribution
    to the first ids (a teacher whose embedding is padded beyond the student's vocabulary, e.g.
    152,064 vs 151,936 rows, is scored on the shared ids only).
    """
    hidden_BTH = response_hidden_states(model, batch)
    _, weight_VH = decoder_and_head(model)
    if vocab_limit is not None:
        weight_VH = weight_VH[:vocab_limit]
    ids_BT = batch.response_ids_BT.clamp(0, weight_VH.shape[0] - 1)
    return fused_logprobs(hidden_BTH, weight_VH, ids_BT, gather_ids_BTK=gather_ids_BTK, topk=topk,
                          temperature=temperature, chunk_size=chunk_size)
