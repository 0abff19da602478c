"""Blockwise policy-drift gate (docs/methods.md §4 steps 1-5; arXiv 2606.24084).

    δ_t = sg(lp_t − lp_old_t)                    (step 1, drift on the sampled path)
    s_b = mean_{t∈b, m_t=1} δ_t                  (step 3, signed block mean; ``statistic="signed_mean"``)
    s_b = mean_{t∈b, m_t=1} |δ_t|                (``statistic="abs_mean"``, opdkit extension, §8)
    g_t = exp(−τ·|s_b|)  for t ∈ b               (step 4)
    g̃_t = g_t / mean_{m=1}(g)                    (step 5, see :func:`normalize_gate` and
                                                  :data:`GATE_NORMALIZATIONS`; ``none`` keeps g_t, §8)

Segments come from :mod:`opdkit.gates.segments` (any int ids, ``-1`` on invalid positions). Gates are
float32, detached, exactly 1.0 on valid tokens when ``lp == lp_old`` and 0 on masked positions.
Everything is vectorized over B and T with segment sums (``index_add_``); no Python loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_SCOPES = ("sequence", "batch")

#: gate.statistic -> per-token value whose segment mean is the block score ``s_b`` (input: δ_BT, float32).
#: ``signed_mean`` is the paper's (§4 step 3); ``abs_mean`` (opdkit extension, §8) stops drifts of opposite
#: sign inside a block from cancelling.
BLOCK_STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "signed_mean": lambda delta_BT: delta_BT,
    "abs_mean": torch.abs,
}


@dataclass(frozen=True)
class GateNormalization:
    """How the mean of a gate is taken out (§4 step 5); the names of gate.normalize come from
    :data:`GATE_NORMALIZATIONS`.

    ``per_sequence``: divide each row by its own valid-token mean (:func:`normalize_gate` ``"sequence"``)
    inside the micro-batch. ``step_batch``: divide the step loss by the mean gate over the optimizer-step
    batch (the reduction's weighted denominator, ``Σ g·l / Σ g`` for token-mean). Neither: the raw
    gate ``g ≤ 1`` multiplies the loss, so an update in which every block drifts is shrunk as a whole.
    """

    per_sequence: bool
    step_batch: bool
    doc: str


GATE_NORMALIZATIONS: dict[str, GateNormalization] = {
    "batch": GateNormalization(False, True, "g / mean(g) over the optimizer-step batch (§4 step 5)"),
    "sequence": GateNormalization(True, False, "g / mean(g) per response (§4 step 5, scope ours)"),
    "none": GateNormalization(False, False, "raw gate, no renormalisation (opdkit extension, §8)"),
}


def get_gate_normalization(name: str) -> GateNormalization:
    """The registered gate normalisation ``name``; an unknown name lists the valid ones."""
    try:
        return GATE_NORMALIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown gate normalisation {name!r}; valid: {', '.join(GATE_NORMALIZATIONS)}") from None


def _statistic(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return BLOCK_STATISTICS[name]
    except KeyError:
        raise ValueError(f"unknown gate statistic {name!r}; valid: {', '.join(BLOCK_STATISTICS)}") from None


def _check(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor,
           segment_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Validate shapes; return the valid-token mask (bool [B,T])."""
    if logp_BT.dim() != 2 or logp_BT.shape != logp_old_BT.shape or logp_BT.shape != mask_BT.shape:
        raise ValueError(f"logp_BT {tuple(logp_BT.shape)}, logp_old_BT {tuple(logp_old_BT.shape)} and "
                         f"mask_BT {tuple(mask_BT.shape)} must be the same 2-D [B,T] shape")
    valid_BT = mask_BT != 0
    if segment_ids_BT is not None:
        if segment_ids_BT.shape != mask_BT.shape:
            raise ValueError(f"segment_ids_BT {tuple(segment_ids_BT.shape)} must match mask_BT "
                             f"{tuple(mask_BT.shape)}")
        if bool((valid_BT & (segment_ids_BT < 0)).any()):
            raise ValueError("segment_ids_BT is negative on a valid (mask != 0) token; every valid "
                             "token needs a segment id >= 0")
    return valid_BT


def _drift(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor) -> torch.Tensor:
    """δ = sg(lp − lp_old) in float32."""
    return (logp_BT.detach().to(torch.float32) - logp_old_BT.detach().to(torch.float32))


def segment_scores(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor,
                   segment_ids_BT: torch.Tensor, *, statistic: str = "signed_mean") -> torch.Tensor:
    """Block score broadcast per token (§4 steps 1 and 3, arXiv 2606.24084; ``abs_mean``: §8, ours).

    Shapes: ``logp_BT``, ``logp_old_BT``, ``mask_BT``, ``segment_ids_BT`` all [B,T] → ``s_BT`` [B,T].
    ``s_t = s_b = mean_{t'∈b, m_t'=1} f(sg(lp_t' − lp_old_t'))`` for the segment ``b`` of token ``t``,
    with ``f`` from :data:`BLOCK_STATISTICS` (``signed_mean``: ``f(δ) = δ``; ``abs_mean``: ``|δ|``);
    0 on masked positions. Float32, detached. Segment ids may be any int64 values (``-1`` allowed only
    where ``mask == 0``); tokens sharing an id form one segment, even across rows.
    """
    f = _statistic(statistic)
    valid_BT = _check(logp_BT, logp_old_BT, mask_BT, segment_ids_BT)
    delta_BT = f(_drift(logp_BT, logp_old_BT))
    s_BT = torch.zeros_like(delta_BT)
    ids_N = segment_ids_BT[valid_BT].to(torch.long)
    if ids_N.numel() == 0:
        return s_BT
    uniq_S, inv_N = torch.unique(ids_N, return_inverse=True)
    S = uniq_S.numel()
    sum_S = torch.zeros(S, dtype=torch.float32, device=delta_BT.device)
    sum_S.index_add_(0, inv_N, delta_BT[valid_BT])
    cnt_S = torch.zeros(S, dtype=torch.float32, device=delta_BT.device)
    cnt_S.index_add_(0, inv_N, torch.ones_like(sum_S[inv_N]))
    s_BT[valid_BT] = (sum_S / cnt_S)[inv_N]
    return s_BT


def drift_gate(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor,
               segment_ids_BT: torch.Tensor, *, tau: float = 1.0, statistic: str = "signed_mean") -> torch.Tensor:
    """Drift gate ``g_t = exp(−τ·|s_b|)`` (§4 steps 1-4, arXiv 2606.24084).

    Shapes: ``logp_BT`` (current student log-prob of the sampled token), ``logp_old_BT`` (behaviour
    student, recorded at sampling), ``mask_BT``, ``segment_ids_BT`` all [B,T] → ``gate_BT`` [B,T].
    ``s_b`` is the signed mean of ``δ = sg(lp − lp_old)`` over the valid tokens of segment ``b``, or the
    mean of ``|δ|`` with ``statistic="abs_mean"`` (:func:`segment_scores`). Float32, detached
    (``requires_grad`` False); exactly 1.0 on valid tokens when ``logp == logp_old``; 0 on masked
    positions. Not normalized: see :func:`normalize_gate` and :data:`GATE_NORMALIZATIONS`.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    s_BT = segment_scores(logp_BT, logp_old_BT, mask_BT, segment_ids_BT, statistic=statistic)
    g_BT = torch.exp(-float(tau) * s_BT.abs())
    return torch.where(mask_BT != 0, g_BT, torch.zeros_like(g_BT))


def normalize_gate(gate_BT: torch.Tensor, mask_BT: torch.Tensor, *, scope: str = "sequence") -> torch.Tensor:
    """Mean-normalize a gate over valid tokens (§4 step 5, arXiv 2606.24084; scope **ours**).

    Shapes: ``gate_BT``, ``mask_BT`` [B,T] → ``gate_BT`` [B,T] (float32 or wider, detached).
    ``scope="sequence"``: ``g̃_bt = g_bt / mean_{t: m_bt=1} g_bt`` per row; ``scope="batch"``:
    ``g̃_t = g_t / mean_{m=1} g`` over the whole tensor. Masked positions are 0 whatever ``gate_BT``
    holds there; a row (or batch) with no valid token, or whose gates sum to 0, stays 0.
    For the optimizer-step scope across micro-batches use the reduction module's weighted mean
    ``Σ g·l / Σ g`` instead (same result, computed from global sums).
    """
    if scope not in _SCOPES:
        raise ValueError(f"unknown normalize_gate scope {scope!r}; valid: {', '.join(_SCOPES)}")
    if gate_BT.shape != mask_BT.shape or gate_BT.dim() != 2:
        raise ValueError(f"gate_BT {tuple(gate_BT.shape)} and mask_BT {tuple(mask_BT.shape)} must be the "
                         "same 2-D [B,T] shape")
    valid_BT = mask_BT != 0
    dtype = torch.promote_types(gate_BT.dtype, torch.float32)
    g_BT = gate_BT.detach().to(dtype)
    g_BT = torch.where(valid_BT, g_BT, torch.zeros_like(g_BT))
    n_BT = valid_BT.to(dtype)
    if scope == "sequence":
        gsum, cnt = g_BT.sum(dim=1, keepdim=True), n_BT.sum(dim=1, keepdim=True)
    else:
        gsum, cnt = g_BT.sum(), n_BT.sum()
    ok = (gsum > 0) & (cnt > 0)
    mean = torch.where(ok, gsum / cnt.clamp(min=1), torch.ones_like(gsum))
    return torch.where(ok, g_BT / mean, torch.zeros_like(g_BT))


def drift_stats(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor,
                gate_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Telemetry sums for §4 ("log gate min / max / std and the mean |δ|"; arXiv 2606.24084).

    Shapes: all inputs [B,T] → dict of 0-d tensors (detached), summable across micro-batches:
    ``abs_drift_sum = Σ_{m=1} |δ_t|`` (float64), ``token_count = Σ m`` (int64),
    ``gate_sum = Σ_{m=1} g`` and ``gate_sq_sum = Σ_{m=1} g²`` (float64), ``gate_min`` / ``gate_max``
    over valid tokens (float32; +inf / −inf when there are none; combine with min / max).
    Then mean |δ| = abs_drift_sum / token_count and std(g) = sqrt(gate_sq_sum/N − (gate_sum/N)²).
    """
    valid_BT = _check(logp_BT, logp_old_BT, mask_BT)
    if gate_BT.shape != mask_BT.shape:
        raise ValueError(f"gate_BT {tuple(gate_BT.shape)} must match mask_BT {tuple(mask_BT.shape)}")
    delta_N = _drift(logp_BT, logp_old_BT)[valid_BT].to(torch.float64)
    g_N = gate_BT.detach()[valid_BT]
    g64_N = g_N.to(torch.float64)
    g32_N = g_N.to(torch.float32)
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=g_N.device)
    return {
        "abs_drift_sum": delta_N.abs().sum(),
        "token_count": valid_BT.sum().to(torch.long),
        "gate_sum": g64_N.sum(),
        "gate_sq_sum": (g64_N * g64_N).sum(),
        "gate_min": g32_N.min() if g32_N.numel() else inf,
        "gate_max": g32_N.max() if g32_N.numel() else -inf,
    }
