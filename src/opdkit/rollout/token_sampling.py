"""Next-token sampling for the rollout sampler: counter-based uniforms, top-k / top-p filters, inverse CDF.

Randomness is counter-based: the uniform of row ``r`` at decode step ``t`` is a hash of
``(seed, r, t)`` (:func:`row_uniforms`), not the next draw of a stateful generator. A row's samples
therefore do not depend on which other rows share its batch, so sampling the rows in chunks (a KV
cache budget) or dropping finished rows from the active batch gives the same tokens as one batch.

Top-p needs the descending order of the probabilities only down to the nucleus boundary: a top-k
prefilter of :data:`TOP_P_PREFILTER` values decides the threshold exactly whenever the nucleus ends
inside it (the mass of the prefilter's more likely tokens reaches ``top_p``); rows whose nucleus is
wider fall back to a full sort (one host sync per step to find out; :class:`TopPFilter` stops trying
the prefilter for a while after it failed).
"""

from __future__ import annotations

import numpy as np
import torch

#: Values taken by the top-k prefilter of top-p (an exact result whenever the nucleus fits inside).
TOP_P_PREFILTER = 128

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59 (no int64 overflow)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def row_uniforms(seed: int, rows_B: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1] (float32, 24-bit grid) for rows ``rows_B`` (int64 ids) at step(s) ``t``.

    ``u = (h(seed, r, t) >> 8 + 1) · 2^-24`` with ``h`` a chain of :func:`_mix32` over the low and high
    32 bits of ``seed``, the row id and the step: a pure function of ``(seed, r, t)``. With an int ``t``
    the result is ``u_B1``; with a step tensor ``t_N`` it is the table ``u_BN``.
    """
    lo, hi = seed & _M32, (seed >> 32) & _M32
    x_B1 = _mix32((rows_B + lo) & _M32)[:, None] ^ hi
    t_1N = torch.as_tensor(t, dtype=torch.long, device=rows_B.device).reshape(1, -1)
    x = _mix32((x_B1 + t_1N * 0x9E3779B1) & _M32)  # t < 2**20 steps: the product stays below 2**52
    x = _mix32(x ^ lo)
    return ((x >> 8) + 1).to(torch.float32) * 2.0 ** -24


def _sorted_desc(z_BV: torch.Tensor) -> torch.Tensor:
    """Each row sorted descending (values only). On CPU numpy's SIMD sort is several times faster."""
    if z_BV.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(np.sort(z_BV.numpy(), axis=-1)[:, ::-1]))
    return z_BV.sort(dim=-1, descending=True).values


def _nucleus_threshold(vals_BK: torch.Tensor, lse_B1: torch.Tensor, top_p: float) -> tuple[torch.Tensor, ...]:
    """Smallest kept logit ``thresh_B1`` of the nucleus over descending values ``vals_BK``.

    Token ``j`` is kept iff the mass of the more likely ones, ``Σ_{i<j} exp(vals_i − lse)``, is < top_p
    (the most likely token always). Also returns ``exact_B``: the count of kept tokens is < K, or the
    K values are the whole support (then the boundary is inside ``vals_BK``).
    """
    p_BK = (vals_BK - lse_B1).exp()
    excl_BK = p_BK.cumsum(dim=-1) - p_BK
    n_B1 = (excl_BK < top_p).sum(dim=-1, keepdim=True).clamp_min_(1)
    return vals_BK.gather(1, n_B1 - 1), n_B1.squeeze(1) < vals_BK.shape[1]


class TopPFilter:
    """:func:`filter_threshold` with the prefilter switched off while it keeps failing.

    Flat distributions (a random model, a high temperature) have nuclei wider than the prefilter at
    every step; then the prefilter is pure overhead (and a host sync on a GPU). After a step that needed
    the full sort, the next ``retry_every − 1`` steps sort directly; then the prefilter is tried again.
    Either way the threshold is the exact one.
    """

    def __init__(self, retry_every: int = 16):
        self.retry_every, self.skip = retry_every, 0

    def __call__(self, z_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
        if self.skip and 0 < top_p < 1.0 and not 0 < top_k < z_BV.shape[1]:
            self.skip -= 1
            lse_B1 = z_BV.logsumexp(dim=-1, keepdim=True)
            return _nucleus_threshold(_sorted_desc(z_BV), lse_B1, top_p)[0]
        thresh_B1, fell_back = _filter_threshold(z_BV, top_k, top_p)
        self.skip = self.retry_every - 1 if fell_back else 0
        return thresh_B1


def filter_threshold(z_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """Per-row logit threshold ``thresh_B1`` of top-k then top-p (keep ``z >= thresh``), or None (no filter).

    top-k keeps ``z >= k``-th largest; top-p, over the top-k renormalised mass, keeps the tokens whose
    more likely tokens hold < ``top_p`` (it drops the least likely tail of mass <= 1 − top_p, as
    transformers' ``TopPLogitsWarper``); exact ties at a threshold are kept together.
    """
    return _filter_threshold(z_BV, top_k, top_p)[0]


def _filter_threshold(z_BV: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor | None, bool]:
    """(:func:`filter_threshold`, whether some row needed the full-sort fallback)."""
    V = z_BV.shape[1]
    top_k = top_k if 0 < top_k < V else 0
    if top_p >= 1.0:
        return (z_BV.topk(top_k, dim=-1).values[:, -1:] if top_k else None), False
    K = top_k or min(V, TOP_P_PREFILTER)
    vals_BK = z_BV.topk(K, dim=-1).values  # sorted descending
    # top-k renormalises over its K values; otherwise the mass is over the whole vocabulary
    lse_B1 = (vals_BK if top_k else z_BV).logsumexp(dim=-1, keepdim=True)
    thresh_B1, exact_B = _nucleus_threshold(vals_BK, lse_B1, top_p)
    if top_k or K == V or bool(exact_B.all()):
        return thresh_B1, False
    full_B1, _ = _nucleus_threshold(_sorted_desc(z_BV), lse_B1, top_p)  # nuclei wider than the prefilter
    return torch.where(exact_B[:, None], thresh_B1, full_B1), True


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float, u_B1: torch.Tensor,
                eos_E: torch.Tensor | None, top_p_filter: TopPFilter | None = None) -> torch.Tensor:
    """One token per row ``[B]`` from temperature → (EOS suppression) → top-k → top-p filtered logits.

    Inverse CDF over the filtered distribution: the first ``v`` with ``cumsum(p)_v >= u · Σp`` for
    ``u_B1`` in (0, 1] (:func:`row_uniforms`), so a token of probability 0 can never be drawn.
    ``top_p_filter``: a :class:`TopPFilter` kept over the steps of one decode loop (same thresholds).
    """
    z_BV = logits_BV / temperature if temperature != 1.0 else logits_BV
    if eos_E is not None:
        z_BV = z_BV.index_fill(1, eos_E, float("-inf"))
    thresh_B1 = (top_p_filter or filter_threshold)(z_BV, top_k, top_p)
    if thresh_B1 is not None:
        z_BV = z_BV.masked_fill(z_BV < thresh_B1, float("-inf"))
    cum_BV = torch.softmax(z_BV, dim=-1).cumsum_(dim=-1)
    u_B1 = u_B1.to(cum_BV.dtype).mul(cum_BV[:, -1:])  # in (0, total]
    return torch.searchsorted(cum_BV, u_B1).squeeze(1).clamp_max_(z_BV.shape[1] - 1)
