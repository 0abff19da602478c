"""Ideal per-token gradient and method logit-ascent directions on a candidate set (docs/methods.md §6).

Paper: "Unmasking On-Policy Distillation", arXiv 2605.10889. Everything here is pure math on small
vectors over the candidate set ``C`` of one node ``u`` (a prefix of a student rollout); it imports
only torch / math and never sees a configuration object.

Notation (all ``[C]`` tensors, float64 recommended): ``p_C`` student probabilities and ``q_C`` teacher
probabilities, both renormalized on ``C``; ``psucc_C`` success probability after forcing each
candidate; ``z_C`` the student logits on ``C`` (``p = softmax(z)``).

* Ideal gradient: ``g*_j = p_j (Psucc_j − P̄)``, ``P̄ = Σ_k p_k Psucc_k``, which is exactly
  ``∂P(success | u) / ∂z_j`` (the ascent direction of the success probability).
* A method's *logit ascent direction* is ``−∂L/∂z`` of its per-position loss ``L`` on ``C``.
  Most have the form ``d_j = p_j (f_j − Σ_k p_k f_k)`` (:func:`centered`):

  ========================  =====================================================================
  reverse KL / OPD (expect.) ``f = log q − log p``  (loss ``KL(p‖q)``; OPD §2.1 in expectation)
  forward KL                ``f = q / p``            (loss ``KL(q‖p)``; ``d = q − p``)
  generalized JSD (β)       ``f = (1−β) log(m/p)``, ``m = βq + (1−β)p``; ``β ∈ {0, 1}`` follow the
                            loss module's endpoint convention (``KL(q‖p)`` / ``KL(p‖q)``)
  Dr.GRPO (expectation)     ``f = E[R | j] = Psucc`` (equals ``g*``)
  MiniLLM                   ``f = log q − log p + F_j``, ``F_j`` the expected future log-ratio
  ========================  =====================================================================

  LSM (§2.2) is a reverse KL between ``p̂``, ``q̂`` renormalized on the teacher's top-K ``S ⊆ C``:
  ``d_j = p̂_j (f_j − Σ_S p̂ f)`` with ``f = log q̂ − log p̂`` for ``j ∈ S`` and 0 outside ``S``.

JSD derivation (checked by autograd in the tests): with ``L = β KL(q‖m) + (1−β) KL(p‖m)``,
``∂L/∂p_k = −β q_k (1−β)/m_k + (1−β)[log(p_k/m_k) + 1 − (1−β) p_k/m_k] = (1−β) log(p_k/m_k)``
(because ``β q_k + (1−β) p_k = m_k``); through the softmax Jacobian ``∂p_k/∂z_j = p_k(δ_kj − p_j)``,
``−∂L/∂z_j = p_j (f_j − Σ p f)`` with ``f = (1−β) log(m/p)``: the sign and the ``(1−β)`` scale of §6
are exactly the ascent direction of ``−JSD_β``.

Every direction sums to zero over ``C`` (a softmax gradient is orthogonal to the all-ones vector).
Alignment = cosine(``g*``, ``d``); nodes whose ``g*`` is zero (all ``Psucc`` equal) are skipped.
A gate (§4) multiplies the direction at its position by a scalar ``w``: the cosine is unchanged, the
magnitude becomes ``w·‖d‖``, and a rollout-level alignment that concatenates the nodes
(:func:`concat_cosine`) does change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ZERO_NORM = 1e-12  # a direction whose L2 norm is at or below this counts as the zero vector


@dataclass(frozen=True)
class NodeTensors:
    """The inputs every direction may use at one node (tensors only; no hyper-parameters).

    p_C / q_C: ``[C]`` student / teacher probabilities renormalized on ``C`` (float64 recommended).
    psucc_C: ``[C]`` success probability (fraction of verified completions) per candidate.
    teacher_topk_C: ``[C]`` bool, the teacher's top-K inside ``C`` (LSM support ``S``).
    sampled: index in ``C`` of the token the rollout actually sampled.
    future_C: ``[C]`` MiniLLM expected future log-ratio ``F_j`` (zeros when not estimated).
    future_norm_C: ``[C]`` the same, length-normalized (MiniLLM's ``R^Norm``; None: ``future_C``).
    reward: verifier reward of the rollout itself (0/1; the sampled-token Dr.GRPO signal).
    p_mass / q_mass: full-vocabulary probability of ``C`` under the student / teacher (1.0: ``C`` is the
    whole vocabulary); ``opd_sampled`` needs them to undo the renormalization (full-vocab log-ratio).
    """

    p_C: torch.Tensor
    q_C: torch.Tensor
    psucc_C: torch.Tensor
    teacher_topk_C: torch.Tensor
    sampled: int
    future_C: torch.Tensor
    reward: float = 0.0
    future_norm_C: torch.Tensor | None = None
    p_mass: float = 1.0
    q_mass: float = 1.0


def _log(x_C: torch.Tensor) -> torch.Tensor:
    """``log x`` with ``log 0 = −inf`` (callers only use it where the matching weight is > 0)."""
    return torch.log(x_C)


def centered(p_C: torch.Tensor, f_C: torch.Tensor) -> torch.Tensor:
    """``d_j = p_j (f_j − Σ_k p_k f_k)`` ``[C]``: the logit ascent direction of ``E_p[f]`` with ``f`` fixed.

    Terms with ``p_j = 0`` contribute 0 even where ``f_j`` is infinite (``0·∞ = 0``).
    """
    pf_C = torch.where(p_C > 0, p_C * f_C, torch.zeros_like(p_C))
    f_C = torch.where(p_C > 0, f_C, torch.zeros_like(f_C))
    return p_C * (f_C - pf_C.sum())


def ideal_gradient(p_C: torch.Tensor, psucc_C: torch.Tensor) -> torch.Tensor:
    """``g*_j = p_j (Psucc_j − P̄)`` ``[C]`` (§6, arXiv 2605.10889): ``∂P(success)/∂z_j`` on ``C``.

    Exactly zero when all ``Psucc`` are equal (no candidate changes the success probability), so such
    nodes are detected without floating-point noise.
    """
    if bool(psucc_C.max() == psucc_C.min()):
        return torch.zeros_like(p_C)
    return centered(p_C, psucc_C)


def reverse_kl_direction(p_C: torch.Tensor, q_C: torch.Tensor) -> torch.Tensor:
    """Ascent direction of ``−KL(p‖q)`` ``[C]``: ``f = log q − log p`` (also sampled-token OPD in expectation)."""
    return centered(p_C, _log(q_C) - _log(p_C))


def forward_kl_direction(p_C: torch.Tensor, q_C: torch.Tensor) -> torch.Tensor:
    """Ascent direction of ``−KL(q‖p)`` ``[C]``: ``f = q / p``, i.e. ``d = q − p Σq`` (= ``q − p``)."""
    return q_C - p_C * q_C.sum()


def jsd_direction(p_C: torch.Tensor, q_C: torch.Tensor, beta: float) -> torch.Tensor:
    """Ascent direction of ``−JSD_β`` ``[C]`` (GKD; ``m = βq + (1−β)p``): ``f = (1−β) log(m/p)``.

    ``β = 0`` / ``β = 1`` follow :func:`opdkit.losses.generalized_jsd` (forward / reverse KL there).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_direction(p_C, q_C)
    if beta == 1.0:
        return reverse_kl_direction(p_C, q_C)
    m_C = beta * q_C + (1.0 - beta) * p_C
    return centered(p_C, (1.0 - beta) * (_log(m_C) - _log(p_C)))


def lsm_direction(p_C: torch.Tensor, q_C: torch.Tensor, support_C: torch.Tensor) -> torch.Tensor:
    """Ascent direction of ``−LSM`` ``[C]`` (§2.2): reverse KL of ``p̂``, ``q̂`` renormalized on ``S``.

    ``support_C`` ``[C]`` bool marks ``S`` (the teacher's top-K inside ``C``); zero outside ``S``.
    """
    s_C = support_C.to(torch.bool)
    if not bool(s_C.any()):
        return torch.zeros_like(p_C)
    ph_S = p_C[s_C] / p_C[s_C].sum()
    qh_S = q_C[s_C] / q_C[s_C].sum()
    out_C = torch.zeros_like(p_C)
    out_C[s_C] = reverse_kl_direction(ph_S, qh_S)
    return out_C


def drgrpo_direction(p_C: torch.Tensor, psucc_C: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO in expectation ``[C]``: ``f_j = E[R | j] = Psucc_j`` (recovers ``g*``)."""
    return centered(p_C, psucc_C)


def minillm_direction(p_C: torch.Tensor, q_C: torch.Tensor, future_C: torch.Tensor) -> torch.Tensor:
    """MiniLLM ``[C]``: ``f = log q − log p + F`` with ``F_j`` the expected future log-ratio after ``j``.

    This is ``−∂/∂z`` of the sequence-level ``KL(π‖q)`` at the node (divided by the probability of
    reaching it) when ``F_j = E[Σ_{t'>t} log q − log π | prefix + j]`` is exact.
    """
    return centered(p_C, _log(q_C) - _log(p_C) + future_C)


def sampled_direction(p_C: torch.Tensor, sampled: int, advantage: float) -> torch.Tensor:
    """Single-sample policy gradient ``A (e_y − p)`` ``[C]``: ``−∂/∂z`` of ``−A log p_y``."""
    d_C = -advantage * p_C
    d_C[sampled] += advantage
    return d_C


def opd_sampled_direction(p_C: torch.Tensor, q_C: torch.Tensor, sampled: int, *, p_mass: float = 1.0,
                          q_mass: float = 1.0) -> torch.Tensor:
    """Sampled-token OPD on the token the rollout drew ``[C]`` (§2.1 at r = 1).

    ``A = log q_y − log π_old,y`` over the full vocabulary, as the trainer computes it:
    ``A = (log q_C[y] + log q_mass) − (log p_C[y] + log p_mass)`` with ``p_C`` / ``q_C`` renormalized
    on ``C`` and ``p_mass`` / ``q_mass`` the full-vocabulary mass of ``C``. The renormalized ratio alone
    is off by ``log(p_mass / q_mass)``, which can flip the sign of ``A`` (p_y = 0.3, q_y = 0.27,
    p_mass = 0.9, q_mass = 0.5: −0.105 in the full vocabulary, +0.48 renormalized).
    """
    adv = float(_log(q_C[sampled]) - _log(p_C[sampled])) + math.log(q_mass) - math.log(p_mass)
    return sampled_direction(p_C, sampled, adv)


def drgrpo_sampled_direction(p_C: torch.Tensor, psucc_C: torch.Tensor, sampled: int, reward: float) -> torch.Tensor:
    """Dr.GRPO on the drawn token with the rollout's own reward ``[C]``: ``A = R − P̄`` (ideal baseline)."""
    return sampled_direction(p_C, sampled, float(reward) - float((p_C * psucc_C).sum()))


Direction = Callable[[NodeTensors], torch.Tensor]

# name -> fn(NodeTensors) -> d_C. "*_sampled" are the single-sample signals on the rollout's own token.
METHODS: dict[str, Direction] = {
    "reverse_kl": lambda n: reverse_kl_direction(n.p_C, n.q_C),
    "opd_sampled": lambda n: opd_sampled_direction(n.p_C, n.q_C, n.sampled, p_mass=n.p_mass, q_mass=n.q_mass),
    "forward_kl": lambda n: forward_kl_direction(n.p_C, n.q_C),
    "jsd_0.5": lambda n: jsd_direction(n.p_C, n.q_C, 0.5),
    "lsm": lambda n: lsm_direction(n.p_C, n.q_C, n.teacher_topk_C),
    "minillm": lambda n: minillm_direction(n.p_C, n.q_C, n.future_C),
    "minillm_norm": lambda n: minillm_direction(
        n.p_C, n.q_C, n.future_C if n.future_norm_C is None else n.future_norm_C),
    "drgrpo": lambda n: drgrpo_direction(n.p_C, n.psucc_C),
    "drgrpo_sampled": lambda n: drgrpo_sampled_direction(n.p_C, n.psucc_C, n.sampled, n.reward),
}


def method_names(jsd_betas: Sequence[float] = ()) -> list[str]:
    """Registry names plus ``jsd_<β>`` for extra β values (resolved by :func:`get_method`)."""
    return list(METHODS) + [f"jsd_{b:g}" for b in jsd_betas if f"jsd_{b:g}" not in METHODS]


def get_method(name: str) -> Direction:
    """A registered direction, or ``jsd_<β>`` for any β in [0, 1]."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith("jsd_"):
        try:
            beta = float(name[4:])
        except ValueError:
            beta = -1.0
        if 0.0 <= beta <= 1.0:
            return lambda n: jsd_direction(n.p_C, n.q_C, beta)
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}, jsd_<beta>")


def norm(d_C: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(d_C.to(torch.float64)))


def is_zero(d_C: torch.Tensor) -> bool:
    return norm(d_C) <= ZERO_NORM


def cosine(a_C: torch.Tensor, b_C: torch.Tensor) -> float:
    """Cosine of two ``[C]`` vectors; NaN when either is the zero vector (norm <= ``ZERO_NORM``)."""
    na, nb = norm(a_C), norm(b_C)
    if na <= ZERO_NORM or nb <= ZERO_NORM:
        return math.nan
    c = float((a_C.to(torch.float64) * b_C.to(torch.float64)).sum()) / (na * nb)
    return max(-1.0, min(1.0, c))


def concat_cosine(g_list: Sequence[torch.Tensor], d_list: Sequence[torch.Tensor],
                  w_list: Sequence[float] | None = None) -> float:
    """Cosine between the concatenations ``[g*_u]_u`` and ``[w_u d_u]_u`` over a rollout's nodes.

    Different nodes are different logits, so the concatenation is the rollout's direction on the
    probed coordinates: ``Σ w_u <g_u, d_u> / (‖g‖ · sqrt(Σ w_u² ‖d_u‖²))``. Gates (``w_list``) change it.
    NaN when either concatenation is zero.
    """
    w_list = [1.0] * len(g_list) if w_list is None else list(w_list)
    dot = sum(w * float((g.double() * d.double()).sum()) for g, d, w in zip(g_list, d_list, w_list))
    ng = math.sqrt(sum(norm(g) ** 2 for g in g_list))
    nd = math.sqrt(sum((w * norm(d)) ** 2 for d, w in zip(d_list, w_list)))
    if ng <= ZERO_NORM or nd <= ZERO_NORM:
        return math.nan
    return max(-1.0, min(1.0, dot / (ng * nd)))


def renormalize(logits_V: torch.Tensor, ids_C: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Probabilities at temperature 1 renormalized on ``ids_C`` (float64 ``[C]``) and the full-vocab mass of C."""
    logp_V = torch.log_softmax(logits_V.to(torch.float64), dim=-1)
    logp_C = logp_V[ids_C]
    return torch.softmax(logp_C, dim=-1), float(torch.logsumexp(logp_C, dim=-1).exp())
