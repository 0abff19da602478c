"""Unbiased pass@k and avg@n (docs/methods.md §7; Chen et al. 2021, Codex, arXiv 2107.03374).

From ``n`` samples of a problem, ``c`` of them correct:

    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)      (1 when n − c < k)

The product form avoids huge binomials. A benchmark score averages over problems; a mean over
benchmarks is the unweighted mean of benchmark scores (callers average the returned floats).
"""

from __future__ import annotations

import torch


def _as_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return v


def _validate(n: int, c: int, k: int) -> None:
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"pass@k needs non-negative n, c, k; got n={n}, c={c}, k={k}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1; got k={k}")
    if c > n:
        raise ValueError(f"pass@k needs c <= n (correct samples cannot exceed samples); got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n (at least k samples per problem); got k={k}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (§7; Chen et al. 2021 Codex): ``1 − C(n−c,k)/C(n,k)``.

    Scalars in, float in [0, 1] out. Computed as ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``; 1.0 when
    ``n − c < k``. Raises ValueError unless ``0 ≤ c ≤ n``, ``1 ≤ k ≤ n``.
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    _validate(n, c, k)
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _counts(n_P: object, c_P: object) -> tuple[torch.Tensor, torch.Tensor]:
    n_P = torch.as_tensor(n_P, dtype=torch.float64).reshape(-1)
    c_P = torch.as_tensor(c_P, dtype=torch.float64).reshape(-1)
    n_P, c_P = torch.broadcast_tensors(n_P, c_P)
    for name, t in (("n", n_P), ("c", c_P)):
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ValueError(f"{name}_P must hold integers")
    if bool((n_P < 0).any()) or bool((c_P < 0).any()):
        raise ValueError("pass@k needs non-negative n and c")
    if bool((c_P > n_P).any()):
        raise ValueError("pass@k needs c <= n for every problem (correct samples cannot exceed samples)")
    return n_P, c_P


def pass_at_k_array(n_P: object, c_P: object, k: int) -> torch.Tensor:
    """Unbiased pass@k per problem, vectorized (§7; Chen et al. 2021 Codex).

    Shapes: ``n_P``, ``c_P`` [P] (lists or tensors; a scalar broadcasts) → ``pass_P`` [P] float64.
    ``pass_p = 1 − Π_{j=0}^{c_p−1} (1 − k/(n_p − j))``, 1 where ``n_p − c_p < k``. Same errors as
    :func:`pass_at_k` (every problem needs ``k ≤ n_p``).
    """
    k = _as_int("k", k)
    n_P, c_P = _counts(n_P, c_P)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1; got k={k}")
    if bool((n_P < k).any()):
        raise ValueError(f"pass@k needs k <= n for every problem; got k={k}, min n={int(n_P.min())}")
    P = n_P.numel()
    width = int(c_P.max().item()) if P else 0
    j_J = torch.arange(width, dtype=torch.float64)
    i_PJ = n_P[:, None] - j_J[None, :]  # i = n, n−1, ..., n−c+1 on the first c_p columns
    used_PJ = j_J[None, :] < c_P[:, None]
    term_PJ = torch.where(used_PJ, 1.0 - k / i_PJ.clamp(min=1.0), torch.ones_like(i_PJ))
    out_P = 1.0 - term_PJ.prod(dim=1)
    return torch.where(n_P - c_P < k, torch.ones_like(out_P), out_P)


def mean_pass_at_k(n_P: object, c_P: object, k: int) -> float:
    """Benchmark pass@k: unweighted mean over problems of :func:`pass_at_k_array` (§7)."""
    p_P = pass_at_k_array(n_P, c_P, k)
    if p_P.numel() == 0:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return float(p_P.mean().item())


def avg_at_n(n_P: object, c_P: object) -> float:
    """avg@n ("per-sample" accuracy, §5): ``mean_p c_p / n_p`` over problems, float.

    Shapes: ``n_P``, ``c_P`` [P] (lists or tensors). Raises ValueError if some ``n_p < 1`` or ``c_p > n_p``.
    """
    n_P, c_P = _counts(n_P, c_P)
    if n_P.numel() == 0:
        raise ValueError("avg_at_n needs at least one problem")
    if bool((n_P < 1).any()):
        raise ValueError("avg_at_n needs n >= 1 for every problem")
    return float((c_P / n_P).mean().item())


__all__ = ["pass_at_k", "pass_at_k_array", "mean_pass_at_k", "avg_at_n"]
