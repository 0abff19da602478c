"""Hand-built verl micro-batches (padded and nested TensorDicts) and a tiny "model" (a logits tensor).

Layout as verl's trainer hands it to the actor: prompts left-padded, responses right-padded,
``left_right_2_no_padding`` (verl's own) packs input ids and teacher top-K into nested tensors; the
"nested" variant also turns prompts / responses / response-aligned tensors into jagged tensors, the other
layout verl's losses accept. The student is a leaf logits tensor ``Z [B,S,V]``: the log-prob of token
``j+1`` comes from ``Z[:, j]``, as a causal LM's shifted logits; so verl's packed path and opdkit's
padded reference differentiate the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding, response_to_nested

V, K, P, R = 13, 4, 4, 9
NEWLINE_ID, SPECIAL_ID = 5, 7


@dataclass
class Batch:
    td: TensorDict  # padded, as the trainer builds it
    Z: torch.Tensor  # [B,S,V] leaf student logits
    lp_old_BR: torch.Tensor
    lq_BR: torch.Tensor  # teacher log-prob of the sampled token
    mask_BR: torch.Tensor  # response mask (bool)
    responses_BR: torch.Tensor
    reward_B: torch.Tensor
    adv_B: torch.Tensor  # verifier advantage R - mean_group(R)
    teacher_topk_logp_BRK: torch.Tensor
    teacher_topk_ids_BRK: torch.Tensor


def _logp_BR(Z: torch.Tensor, ids_BS: torch.Tensor) -> torch.Tensor:
    logits_BRV = Z[:, P - 1: P - 1 + R]
    return torch.log_softmax(logits_BRV.float(), -1).gather(-1, ids_BS[:, P: P + R, None]).squeeze(-1)


def student_logp_BR(b: Batch) -> torch.Tensor:
    """opdkit's reference: ``log π(y_t)`` from the logits at the position before each response token."""
    return _logp_BR(b.Z, b.td["input_ids"])


def student_support_logits_BRK(b: Batch) -> torch.Tensor:
    return b.Z[:, P - 1: P - 1 + R].gather(-1, b.teacher_topk_ids_BRK)


def make_batch(B: int = 8, topk: bool = False, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, P + 1, (B,), generator=g)
    rlen = torch.randint(3, R + 1, (B,), generator=g)
    rlen[0] = R
    S = P + R
    ar = torch.arange(S)
    attn = ((ar[None] >= P - plen[:, None]) & (ar[None] < P + rlen[:, None])).long()
    ids = torch.randint(1, V, (B, S), generator=g) * attn
    ids[1, P: P + 6] = torch.tensor([SPECIAL_ID, 3, NEWLINE_ID, 2, SPECIAL_ID, NEWLINE_ID])  # masks / newlines
    ids = ids * attn
    Z = (1.5 * torch.randn(B, S, V, generator=g)).requires_grad_(True)
    mask_BR = attn[:, P:].bool()
    with torch.no_grad():
        lp = _logp_BR(Z, ids)
    lp_old = torch.where(mask_BR, lp + 0.4 * torch.randn(B, R, generator=g), 0.0)
    lq = torch.where(mask_BR, lp + torch.randn(B, R, generator=g), 0.0)
    reward = torch.randint(0, 2, (B,), generator=g).float()
    group = torch.arange(B) // 4
    adv = reward - torch.stack([reward[group == i].mean() for i in group])
    # teacher info indexed by the logits position (j predicts j+1), as verl's teacher loop stores it
    t_logp = torch.zeros(B, S, K if topk else 1)
    t_ids = torch.zeros(B, S, K if topk else 1, dtype=torch.long)
    if topk:
        perms = [torch.randperm(V, generator=g)[:K] for _ in range(B * R)]
        t_ids[:, P - 1: P - 1 + R] = torch.stack(perms).view(B, R, K)
        t_logp[:, P - 1: P - 1 + R] = torch.log_softmax(torch.randn(B, R, V, generator=g), -1).gather(
            -1, t_ids[:, P - 1: P - 1 + R])
    else:
        t_ids[:, P - 1: P - 1 + R, 0] = ids[:, P:]
        t_logp[:, P - 1: P - 1 + R, 0] = lq
    td = TensorDict({
        "prompts": ids[:, :P], "responses": ids[:, P:], "input_ids": ids, "attention_mask": attn,
        "position_ids": (attn.cumsum(-1) - 1).clamp_min(0), "response_mask": attn[:, P:],
        "old_log_probs": lp_old, "teacher_logprobs": t_logp, "teacher_ids": t_ids,
        "token_level_scores": torch.where(ar[None, :R] == rlen[:, None] - 1, reward[:, None], 0.0),
        "advantages": adv[:, None] * attn[:, P:],
    }, batch_size=[B])
    return Batch(td, Z, lp_old, lq, mask_BR, ids[:, P:], reward, adv, t_logp[:, P - 1: P - 1 + R],
                 t_ids[:, P - 1: P - 1 + R])


def micro_batch(b: Batch, rows, *, nested: bool, batch_num_tokens: int, dp_size: int, hook: bool):
    """verl micro-batch of ``rows`` (no-padding format; ``nested`` also jags the response-aligned tensors)."""
    td = left_right_2_no_padding(b.td[torch.as_tensor(rows)].clone())
    if nested:
        rm = td["response_mask"]
        rm_nested = response_to_nested(rm, torch.nested.as_nested_tensor(
            [r[: int(r.sum())] for r in rm], layout=torch.jagged))
        plen = td["attention_mask"][:, :P].sum(-1)
        td["prompts"] = torch.nested.as_nested_tensor([p[P - n:] for p, n in zip(td["prompts"], plen)],
                                                      layout=torch.jagged)
        for k in ("responses", "old_log_probs", "token_level_scores", "advantages"):
            td[k] = response_to_nested(td[k], rm_nested)
        td["response_mask"] = rm_nested
        del td["attention_mask"]
    tu.assign_non_tensor(td, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=len(rows))
    if hook:
        tu.assign_non_tensor(td, opdkit_exact_denominator=True)
    return td


def packed_logits(b: Batch, rows) -> torch.Tensor:
    """Student logits of ``rows`` packed like verl's remove-padding forward: ``(N, V)``."""
    attn = b.td["attention_mask"][torch.as_tensor(rows)].bool()
    return b.Z[torch.as_tensor(rows)][attn]


def model_output(b: Batch, rows, td) -> dict:
    """What verl's FSDP engine puts in ``model_output``: nested log-probs of the next token per position."""
    attn = b.td["attention_mask"][torch.as_tensor(rows)].bool()
    logits_NV = packed_logits(b, rows)
    ids_N = b.td["input_ids"][torch.as_tensor(rows)][attn]
    lp_N = torch.log_softmax(logits_NV.float(), -1).gather(-1, torch.roll(ids_N, -1)[:, None]).squeeze(-1)
    return {"log_probs": torch.nested.nested_tensor_from_jagged(lp_N, td["input_ids"].offsets())}
