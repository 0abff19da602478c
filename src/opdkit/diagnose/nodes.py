"""Targeted rollouts: success probability per candidate token at chosen nodes of a student rollout.

docs/methods.md §6 (arXiv 2605.10889; the algorithm is **ours**). For one student rollout ``y`` of prompt
``x`` and the nodes ``u_t = (x, y_<t)`` at exponentially spaced positions (:func:`node_positions`):

1. student logits at every node (one forward over prompt + response), and each teacher's;
2. candidates per teacher ``C_T = {y_t} ∪ top-k(student) ∪ top-k(teacher T)``; their union ``U`` is
   probed once (``Psucc`` depends only on the student), each teacher then uses its own ``C_T``;
3. every candidate ``j ∈ U`` is forced after the prefix and completed ``M`` times by the student at
   the training temperature / top-p, all ``|U|·M`` completions in ONE :func:`sample_rollouts` call;
   the response cap stays the rollout's (``max_new_tokens − t − 1`` new tokens). A candidate that is
   an EOS id, or that fills the cap, ends the response: it is graded once, deterministically;
4. the verifier grades ``y_<t + j + completion``: ``Psucc_j`` = fraction accepted;
5. MiniLLM's future term, per teacher: the mean over the completions of ``Σ (log q − log π)`` over the
   completion tokens (``log π`` is the sampler's temperature-1 behaviour log-prob, ``log q`` the
   teacher's, both full-vocabulary, §0), and the length-normalized mean (MiniLLM's ``R^Norm``).
   The completions follow the sampling policy (temperature, top-p), so with top-p < 1 this is the
   future log-ratio under that policy, a slightly biased estimate of MiniLLM's on-policy expectation.

Nodes are visited in order of depth while the completion-token budget lasts (a node whose estimated
cost ``|U|·M·(L − t − 1)`` would exceed the remaining budget stops the walk). Each node has its own
generator seeded from ``(seed, rollout, t)``: results do not depend on which other rollouts run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.scoring import decoder_and_head
from opdkit.rollout.teacher import score_with_teacher

Grade = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class ProbeParams:
    """How nodes are chosen and probed (§6 defaults: k = 3, M = 8, training temperature 1, top-p 0.9)."""

    k: int = 3
    m: int = 8
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 256
    budget_tokens: int = 60_000
    max_nodes: int = 16
    minillm: bool = True


@dataclass
class NodeProbe:
    """One probed node. Tensors on CPU. ``U`` = union of the candidates of all teachers.

    pos: 0-based response position ``t`` of the token being decided (depth ``t + 1``).
    union_ids_U: candidate token ids; sampled_id: ``y_t``; student_logits_V: student logits at ``t``.
    teacher_logits: {teacher: logits_V at ``t`` on the shared vocabulary}.
    cand_idx: {teacher: indices into ``U`` of ``C_T`` (sampled first)}.
    rewards_UM: ``[U, M]`` verifier rewards; psucc_U: their row means.
    future_sum / future_mean: {teacher: ``[U]`` MiniLLM future log-ratio (sum / per-token mean)}.
    completions: sampled completions; completion_tokens: their total length.
    """

    pos: int
    sampled_id: int
    union_ids_U: torch.Tensor
    student_logits_V: torch.Tensor
    teacher_logits: dict[str, torch.Tensor]
    cand_idx: dict[str, list[int]]
    rewards_UM: torch.Tensor
    psucc_U: torch.Tensor
    future_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    future_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    completions: int = 0
    completion_tokens: int = 0
    sample_seconds: float = 0.0


def node_positions(length: int, max_nodes: int = 64) -> list[int]:
    """0-based positions ``t = 2^i − 1`` (depths 1, 2, 4, 8, …) below ``length``, at most ``max_nodes``."""
    out, d = [], 1
    while d <= length and len(out) < max_nodes:
        out.append(d - 1)
        d *= 2
    return out


def node_seed(seed: int, rollout: int, pos: int) -> int:
    """A per-node seed (stable, independent of the other rollouts and nodes)."""
    return (int(seed) * 1_000_003 + int(rollout) * 10_007 + int(pos)) % (2**62)


@torch.no_grad()
def logits_at(model, prompt_ids: list[int], response_ids: list[int], positions: list[int],
              vocab: int) -> torch.Tensor:
    """Float32 logits ``[N, vocab]`` (CPU) predicting response positions ``positions`` (one forward)."""
    decoder, weight_VH = decoder_and_head(model)
    dev = weight_VH.device
    P, last = len(prompt_ids), max(positions)
    ids = torch.as_tensor(prompt_ids + response_ids[:last], dtype=torch.long, device=dev)[None]
    was_training = model.training
    model.eval()
    try:
        h_LH = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state[0]
    finally:
        model.train(was_training)
    h_NH = h_LH[torch.as_tensor([P - 1 + t for t in positions], device=dev)]
    return (h_NH @ weight_VH[:vocab].T).float().cpu()


def candidate_ids(sampled: int, student_logits_V: torch.Tensor, teacher_logits_V: torch.Tensor, k: int) -> list[int]:
    """``[y_t] + top-k(student) + top-k(teacher)`` without repeats, in that order."""
    ids = [sampled] + student_logits_V.topk(k).indices.tolist() + teacher_logits_V.topk(k).indices.tolist()
    return list(dict.fromkeys(int(i) for i in ids))


def probe_rollout(student, teachers: dict, prompt_ids: list[int], response_ids: list[int], answer: str, *,
                  grade: Grade, decode: Callable[[list[int]], str], params: ProbeParams,
                  eos_token_ids: list[int], pad_token_id: int, vocab: int, seed: int = 0,
                  rollout: int = 0, teacher_prompts: dict | None = None) -> list[NodeProbe]:
    """Probe the nodes of one student rollout (module docstring); returns one :class:`NodeProbe` each.

    Args:
        student / teachers: causal LMs (``teachers``: {name: model}, sharing the first ``vocab`` ids).
        prompt_ids / response_ids: the rollout (response without padding, EOS included if it stopped).
        answer: reference answer; grade: ``fn(texts, answers) -> rewards``; decode: ids -> response text.
        vocab: shared vocabulary size (candidates and distributions live on ``[0, vocab)``).
        seed / rollout: seed the per-node generators (:func:`node_seed`).
        teacher_prompts: {teacher: prompt ids} of teachers that score under their own context (opdkit
            extension, :mod:`opdkit.diagnose.contexts`); the others see ``prompt_ids``. Only the teacher's
            prompt differs: it scores the same response tokens and completions.
    """
    t_prompts = {name: (teacher_prompts or {}).get(name, list(prompt_ids)) for name in teachers}
    L = len(response_ids)
    positions = node_positions(L, params.max_nodes)
    if not positions:
        return []
    s_logits_NV = logits_at(student, prompt_ids, response_ids, positions, vocab)
    t_logits = {name: logits_at(t, t_prompts[name], response_ids, positions, vocab) for name, t in teachers.items()}
    eos = {int(e) for e in eos_token_ids}
    device = next(student.parameters()).device
    out, spent = [], 0
    for n, t in enumerate(positions):
        sampled = int(response_ids[t])
        cands = {name: candidate_ids(sampled, s_logits_NV[n], tl[n], params.k) for name, tl in t_logits.items()}
        union = list(dict.fromkeys(i for c in cands.values() for i in c))
        cap = params.max_new_tokens - t - 1  # new tokens left after the forced candidate
        if spent + len(union) * params.m * max(min(L - t - 1, cap), 1) > params.budget_tokens:
            break
        prefix = list(prompt_ids) + list(response_ids[:t])
        open_u = [u for u, c in enumerate(union) if c not in eos and cap >= 1]
        rewards_UM = torch.zeros(len(union), params.m)
        futures = {name: (torch.zeros(len(union)), torch.zeros(len(union))) for name in teachers}
        n_tok, dt = 0, 0.0
        if open_u:
            gen = torch.Generator(device=device).manual_seed(node_seed(seed, rollout, t))
            n_tok, dt = _complete_open(student, teachers, t_prompts, teacher_prompts or {}, response_ids[:t],
                                       prefix, [union[u] for u in open_u], answer, cap, gen, rewards_UM, futures,
                                       open_u, grade=grade, decode=decode, params=params, vocab=vocab,
                                       eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
        closed = [u for u in range(len(union)) if u not in open_u]
        if closed:  # the forced token ends the response: one deterministic grade
            texts = [decode(list(response_ids[:t]) + [union[u]]) for u in closed]
            rewards_UM[closed] = torch.as_tensor(grade(texts, [answer] * len(texts)), dtype=torch.float32)[:, None]
        spent += n_tok
        out.append(NodeProbe(
            pos=t, sampled_id=sampled, union_ids_U=torch.as_tensor(union), student_logits_V=s_logits_NV[n],
            teacher_logits={name: tl[n] for name, tl in t_logits.items()},
            cand_idx={name: [union.index(i) for i in c] for name, c in cands.items()},
            rewards_UM=rewards_UM, psucc_U=rewards_UM.mean(dim=1),
            future_sum={name: f[0] for name, f in futures.items()},
            future_mean={name: f[1] for name, f in futures.items()},
            completions=len(open_u) * params.m, completion_tokens=n_tok, sample_seconds=dt))
    return out


def _complete_open(student, teachers: dict, t_prompts: dict, own_context: dict, head: list[int], prefix: list[int],
                   forced: list[int], answer: str, cap: int, gen: torch.Generator, rewards_UM: torch.Tensor,
                   futures: dict, open_u: list[int], *, grade: Grade, decode, params: ProbeParams, vocab: int,
                   eos_token_ids: list[int], pad_token_id: int) -> tuple[int, float]:
    """``params.m`` student completions after each forced candidate that does not end the response, graded
    into ``rewards_UM[open_u]``; with ``params.minillm`` each teacher's future log-ratio into ``futures``.
    Returns (completion tokens, sampling seconds)."""
    sp = SamplingParams(temperature=params.temperature, top_p=params.top_p, max_new_tokens=cap,
                        samples_per_prompt=params.m)
    t0 = time.perf_counter()
    batch = sample_rollouts(student, [prefix + [c] for c in forced], sp, eos_token_ids=eos_token_ids,
                            pad_token_id=pad_token_id, generator=gen)
    dt = time.perf_counter() - t0
    comp_ids = [r[m.bool()].tolist() for r, m in zip(batch.response_ids_BT.cpu(), batch.response_mask_BT.cpu())]
    texts = [decode(list(head) + [c] + comp_ids[i * params.m + j])
             for i, c in enumerate(forced) for j in range(params.m)]
    r = torch.as_tensor(grade(texts, [answer] * len(texts)), dtype=torch.float32).view(len(forced), params.m)
    rewards_UM[open_u] = r
    if params.minillm:
        for name, teacher in teachers.items():
            rows = ([t_prompts[name] + list(head) + [c] for c in forced for _ in range(params.m)]  # prompt-major,
                    if name in own_context else None)  # as sample_rollouts lays them out
            fs, fm = _future_log_ratio(teacher, batch, vocab, rows)
            futures[name][0][open_u] = fs.view(len(forced), params.m).mean(dim=1)
            futures[name][1][open_u] = fm.view(len(forced), params.m).mean(dim=1)
    return sum(len(c) for c in comp_ids), dt


def _future_log_ratio(teacher, batch: RolloutBatch, vocab: int,
                      prompts: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion row ``[B]``: ``Σ_t (log q − log π_old)`` over its tokens, and that sum / its length
    (``prompts``: the teacher's prompt per row, see :func:`opdkit.rollout.teacher.score_with_teacher`)."""
    _, w = decoder_and_head(teacher)
    limit = vocab if w.shape[0] > vocab else None
    scored = score_with_teacher(teacher, batch, topk=0, microbatch_size=64, vocab_limit=limit, prompts=prompts)
    m_BT = batch.response_mask_BT.float()
    diff_BT = (scored.teacher_logp_BT - batch.logp_old_BT) * m_BT
    s_B = diff_BT.sum(dim=1).cpu()
    return s_B, s_B / m_BT.sum(dim=1).clamp_min(1).cpu()
