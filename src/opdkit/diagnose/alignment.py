"""Node records: ``g*``, every method's direction, and their alignment at a probed node (docs/methods.md §6).

Orchestration between :mod:`opdkit.diagnose.nodes` (what was measured) and the pure math of
:mod:`opdkit.diagnose.directions`: for one :class:`~opdkit.diagnose.nodes.NodeProbe` and one teacher it
renormalizes ``p`` and ``q`` on that teacher's candidate set ``C_T`` (temperature 1, float64), builds
:class:`~opdkit.diagnose.directions.NodeTensors`, and returns a JSON-ready record with the cosine and
the norm of each method direction (and the gate-weighted norm when a gate weight is given). The
direction vectors themselves are returned too, for rollout-level concatenated cosines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from opdkit.diagnose.directions import NodeTensors, cosine, get_method, ideal_gradient, is_zero, norm, renormalize
from opdkit.diagnose.nodes import NodeProbe


def _r(x: float, nd: int = 6) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def node_record(probe: NodeProbe, teacher: str, methods: Sequence[str], *, lsm_k: int = 3, reward: float = 0.0,
                gate: float | None = None,
                decode_token: Callable[[int], str] = str) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """The record of one node for one teacher, ``g*_C`` and ``{method: d_C}`` (float64, ``[C]``).

    Args:
        probe: the measured node; teacher: which teacher's ``C_T``, ``q`` and MiniLLM future to use.
        methods: direction names (:func:`opdkit.diagnose.directions.get_method`).
        lsm_k: LSM support = the teacher's top-``lsm_k`` ids inside ``C_T``.
        reward: the rollout's own verifier reward (for ``drgrpo_sampled``).
        gate: drift-gate weight at this position (None: no gate run given).
        decode_token: id -> display text.
    """
    idx = probe.cand_idx[teacher]
    ids_C = probe.union_ids_U[idx]
    p_C, p_mass = renormalize(probe.student_logits_V, ids_C)
    q_C, q_mass = renormalize(probe.teacher_logits[teacher], ids_C)
    psucc_C = probe.psucc_U[idx].to(torch.float64)
    tl_V = probe.teacher_logits[teacher]
    top = set(tl_V.topk(min(lsm_k, tl_V.numel())).indices.tolist())
    support_C = torch.as_tensor([int(i) in top for i in ids_C.tolist()])
    fs, fm = probe.future_sum.get(teacher), probe.future_mean.get(teacher)
    future_C = fs[idx].to(torch.float64) if fs is not None else torch.zeros_like(p_C)
    future_norm_C = fm[idx].to(torch.float64) if fm is not None else torch.zeros_like(p_C)
    node = NodeTensors(p_C=p_C, q_C=q_C, psucc_C=psucc_C, teacher_topk_C=support_C, sampled=0,
                       future_C=future_C, reward=float(reward), future_norm_C=future_norm_C,
                       p_mass=p_mass, q_mass=q_mass)
    g_C = ideal_gradient(p_C, psucc_C)
    dirs = {m: get_method(m)(node) for m in methods}
    skipped = is_zero(g_C)
    rec = {
        "teacher": teacher, "pos": probe.pos, "depth": probe.pos + 1,
        "sampled_id": probe.sampled_id,
        "candidates": ids_C.tolist(), "candidate_text": [decode_token(int(i)) for i in ids_C.tolist()],
        "p": [_r(x) for x in p_C.tolist()], "q": [_r(x) for x in q_C.tolist()],
        "psucc": [_r(x, 4) for x in psucc_C.tolist()],
        "future": [_r(x, 4) for x in future_C.tolist()],
        "future_norm": [_r(x, 4) for x in future_norm_C.tolist()],
        "lsm_support": support_C.tolist(),
        "p_mass": _r(p_mass), "q_mass": _r(q_mass),
        "pbar": _r(float((p_C * psucc_C).sum())), "gstar_norm": _r(norm(g_C), 9),
        "skipped": skipped, "gate": _r(gate) if gate is not None else None,
        "alignment": {m: (None if skipped else _r(cosine(g_C, d))) for m, d in dirs.items()},
        "magnitude": {m: _r(norm(d), 9) for m, d in dirs.items()},
    }
    if gate is not None:
        rec["gated_magnitude"] = {m: _r(gate * norm(d), 9) for m, d in dirs.items()}
    return rec, g_C, dirs
