"""SG-OPD sign-consistency gate (docs/methods.md §5.1; arXiv 2606.09304; constants **review**, forms **ours**).

    σ^T_t = sign(A_t)                  teacher direction per token (A = OPD advantage of §2.1)
    σ^V_i = 2 R_i − 1                  verifier direction per rollout, R_i ∈ {0, 1}
    A^V_i = R_i − mean_{j∈group(i)} R_j
    A'_t  = λ·A_t                      if σ^T_t = σ^V_i   (agree: extrapolate, λ = 1.8)
    A'_t  = (1−β)·A_t + β·A^V_i        otherwise          (disagree: interpolate, β = 1)

``A_t = 0`` has sign 0, which never equals ``σ^V ∈ {−1, +1}``: such tokens take the disagree branch,
``A' = β·A^V``. For a non-binary reward we use ``σ^V = sign(2R − 1)`` (identical for R ∈ {0, 1}).
With λ = 1, β = 0 the output equals the input advantage exactly (plain sampled-token OPD).
"""

from __future__ import annotations

import torch

_BASELINES = ("group_mean", "none")


def _check(advantage_BT: torch.Tensor, reward_B: torch.Tensor, mask_BT: torch.Tensor) -> None:
    if advantage_BT.dim() != 2 or advantage_BT.shape != mask_BT.shape:
        raise ValueError(f"advantage_BT {tuple(advantage_BT.shape)} and mask_BT {tuple(mask_BT.shape)} "
                         "must be the same 2-D [B,T] shape")
    if reward_B.dim() != 1 or reward_B.shape[0] != advantage_BT.shape[0]:
        raise ValueError(f"reward_B {tuple(reward_B.shape)} must be 1-D with B={advantage_BT.shape[0]}")


def _agree_BT(advantage_BT: torch.Tensor, reward_B: torch.Tensor) -> torch.Tensor:
    """Bool [B,T]: ``sign(A_t) == sign(2 R_i − 1)``."""
    sig_t = torch.sign(advantage_BT.detach())
    sig_v = torch.sign(2 * reward_B.detach().to(sig_t.dtype) - 1)
    return sig_t == sig_v[:, None]


def verifier_advantage(reward_B: torch.Tensor, group_ids_B: torch.Tensor, *,
                       baseline: str = "group_mean") -> torch.Tensor:
    """Verifier advantage ``A^V_i`` (§5.1, arXiv 2606.09304).

    Shapes: ``reward_B`` [B], ``group_ids_B`` [B] (any ints; same id = same prompt) → ``A^V_B`` [B].
    ``baseline="group_mean"``: ``A^V_i = R_i − mean_{j: g_j = g_i} R_j``; ``"none"``: ``A^V_i = R_i``.
    Float32 or wider, detached.
    """
    if baseline not in _BASELINES:
        raise ValueError(f"unknown verifier baseline {baseline!r}; valid: {', '.join(_BASELINES)}")
    dtype = torch.promote_types(reward_B.dtype, torch.float32)
    r_B = reward_B.detach().to(dtype)
    if baseline == "none":
        return r_B.clone()
    group_ids_B = torch.as_tensor(group_ids_B, device=r_B.device)
    if group_ids_B.shape != r_B.shape:
        raise ValueError(f"group_ids_B {tuple(group_ids_B.shape)} must match reward_B {tuple(r_B.shape)}")
    _, inv_B = torch.unique(group_ids_B, return_inverse=True)
    G = int(inv_B.max().item()) + 1 if inv_B.numel() else 0
    sum_G = torch.zeros(G, dtype=dtype, device=r_B.device).index_add_(0, inv_B, r_B)
    cnt_G = torch.zeros(G, dtype=dtype, device=r_B.device).index_add_(0, inv_B, torch.ones_like(r_B))
    return r_B - (sum_G / cnt_G)[inv_B]


def sign_consistency_advantage(advantage_BT: torch.Tensor, reward_B: torch.Tensor,
                               group_ids_B: torch.Tensor | None, mask_BT: torch.Tensor, *, lam: float = 1.8,
                               beta: float = 1.0, baseline: str = "group_mean",
                               verifier_advantage_B: torch.Tensor | None = None) -> torch.Tensor:
    """Sign-consistency gated advantage ``A'`` (§5.1, arXiv 2606.09304).

    Shapes: ``advantage_BT`` [B,T] (OPD advantage ``A_t = sg(lq_t − lp_old_t)``), ``reward_B`` [B]
    (verifier reward, 0/1), ``group_ids_B`` [B] (prompt id of each rollout), ``mask_BT`` [B,T]
    → ``advantage_BT`` [B,T]:
    ``A'_t = λ·A_t`` where ``sign(A_t) = 2R_i − 1``, else ``(1−β)·A_t + β·A^V_i`` with ``A^V`` from
    :func:`verifier_advantage` (``baseline`` "group_mean" or "none"). 0 on masked positions, detached,
    dtype = promote(advantage dtype, float32). ``A_t = 0`` takes the disagree branch (module docstring).
    ``verifier_advantage_B`` [B]: a precomputed ``A^V`` (e.g. by an engine whose micro-batches split the
    prompt groups); then ``group_ids_B`` and ``baseline`` are not used.
    """
    _check(advantage_BT, reward_B, mask_BT)
    dtype = torch.promote_types(advantage_BT.dtype, torch.float32)
    a_BT = advantage_BT.detach().to(dtype)
    if verifier_advantage_B is None:
        av_B = verifier_advantage(reward_B, group_ids_B, baseline=baseline).to(dtype)
    else:
        if verifier_advantage_B.shape != reward_B.shape:
            raise ValueError(f"verifier_advantage_B {tuple(verifier_advantage_B.shape)} must match reward_B "
                             f"{tuple(reward_B.shape)}")
        av_B = verifier_advantage_B.detach().to(dtype)
    agree_BT = _agree_BT(a_BT, reward_B)
    out_BT = torch.where(agree_BT, lam * a_BT, (1.0 - beta) * a_BT + beta * av_B[:, None])
    return torch.where(mask_BT != 0, out_BT, torch.zeros_like(out_BT))


def sign_agreement(advantage_BT: torch.Tensor, reward_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Telemetry: 1.0 where ``sign(A_t) = 2R_i − 1`` on valid tokens, else 0 (§5.1, arXiv 2606.09304).

    Shapes: ``advantage_BT`` [B,T], ``reward_B`` [B], ``mask_BT`` [B,T] → ``agree_BT`` [B,T] float32
    (0 on masked positions; ``A_t = 0`` never agrees). Its masked mean is the agreement rate.
    """
    _check(advantage_BT, reward_B, mask_BT)
    return (_agree_BT(advantage_BT, reward_B) & (mask_BT != 0)).to(torch.float32)
