"""Sampled-token log-probs and top-K, chunked over positions (never a float32 ``[B,T,V]`` tensor).

Everything OPD needs from a model's output distribution at each position is small:
the log-prob of the sampled token ``logp_BT`` (§0), the log-normaliser ``lse_BT``, the logits at a
few given ids (the teacher's top-K support, for LSM §2.2 and top-K divergences §2.3), and for the
teacher its own top-K ids and logits. :func:`fused_logprobs` computes these from the final hidden
states and the LM head weight, ``chunk_size`` positions at a time, with a hand-written backward that
recomputes each chunk's logits instead of keeping them: peak extra memory is ``O(chunk_size * V)``
instead of ``O(B * T * V)``, which is what makes V = 151,936 and T = 16k responses fit.

Log-probs are at temperature ``temperature`` (1.0 for everything in docs/methods.md §0), computed in
float32 whatever the model dtype: from bf16 hidden states / head (a bf16 teacher, or bf16 autocast) the
product runs on bf16 operands but its result, the logits, is float32, so nothing is rounded to bf16
before the log-softmax and the top-K. The backward runs under the forward's autocast state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LogprobOutput(NamedTuple):
    """Result of :func:`fused_logprobs` / :func:`logprobs_from_logits` (shapes for ``[B,T]`` input).

    logp_BT: log-prob of ``ids_BT`` (differentiable).
    lse_BT: log-sum-exp of the (temperature-scaled) logits (differentiable).
    gathered_logits_BTK: logits at ``gather_ids_BTK`` (differentiable), or None.
    topk_ids_BTK / topk_logits_BTK: the model's own top-k (no gradient), or None.
    """

    logp_BT: torch.Tensor
    lse_BT: torch.Tensor
    gathered_logits_BTK: torch.Tensor | None
    topk_ids_BTK: torch.Tensor | None
    topk_logits_BTK: torch.Tensor | None


def _chunk_stats(z_NV, ids_N, gather_ids_NK, topk):
    """Per-chunk statistics from float32 logits ``z_NV`` (may be modified in place afterwards)."""
    logit_y_N = z_NV.gather(1, ids_N[:, None]).squeeze(1)
    gathered_NK = z_NV.gather(1, gather_ids_NK) if gather_ids_NK is not None else None
    top = z_NV.topk(topk, dim=-1) if topk else None
    lse_N = torch.logsumexp(z_NV, dim=-1)
    return logit_y_N - lse_N, lse_N, gathered_NK, top


def _compute_dtype(device_type: str, *dtypes: torch.dtype) -> torch.dtype:
    """The dtype the LM-head product runs in: autocast's when it is on, else the promoted input dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


# (device, dtype) -> whether torch.mm(a, b, out_dtype=torch.float32) works for inputs of that dtype there
_MM_OUT_DTYPE: dict[tuple[torch.device, torch.dtype], bool] = {}


def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has a float32-output mm for ``dtype`` inputs on ``device`` (recent CUDA
    builds have it; CPU builds have not). Probed once per (device, dtype) on a tiny product."""
    key = (device, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def _operand(x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the compute dtype, then float32 unless a float32-output mm exists (the products of
    bf16 values are exact in float32, so both routes give float32 logits from the same rounded inputs)."""
    x = x.to(cdt)
    return x if cdt == torch.float32 or _mm_out_dtype_works(x.device, cdt) else x.float()


def _mm_f32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with a float32 result (``acc += a @ b`` when ``acc`` is given), operands from
    :func:`_operand`: never rounds the logits to bf16 before the log-softmax."""
    if a.dtype == torch.float32:
        return a @ b if acc is None else acc.addmm_(a, b)
    out = torch.mm(a, b, out_dtype=torch.float32)
    return out if acc is None else acc.add_(out)


def _fused_forward(ctx, hidden_NH, weight_VH, ids_N, gather_ids_NK, topk, temperature, chunk_size):
    dev = hidden_NH.device
    cdt = _compute_dtype(dev.type, hidden_NH.dtype, weight_VH.dtype)
    N = hidden_NH.shape[0]
    logp_N = torch.empty(N, dtype=torch.float32, device=dev)
    lse_N = torch.empty(N, dtype=torch.float32, device=dev)
    K = gather_ids_NK.shape[1] if gather_ids_NK is not None else 0
    gathered_NK = torch.empty(N, K, dtype=torch.float32, device=dev)
    top_ids = torch.empty(N, topk, dtype=torch.long, device=dev)
    top_vals = torch.empty(N, topk, dtype=torch.float32, device=dev)
    # Explicit casts, autocast off: the product runs in ``cdt`` but its result is float32 (autocast would
    # round the logits to bf16, and the backward must recompute exactly the forward's logits).
    with torch.autocast(dev.type, enabled=False):
        w_HV = _operand(weight_VH, cdt).T
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = _mm_f32(_operand(hidden_NH[s:e], cdt), w_HV)
            if temperature != 1.0:
                z.div_(temperature)
            g_ids = gather_ids_NK[s:e] if K else None
            lp, lse, gath, top = _chunk_stats(z, ids_N[s:e], g_ids, topk)
            logp_N[s:e], lse_N[s:e] = lp, lse
            if K:
                gathered_NK[s:e] = gath
            if topk:
                top_vals[s:e], top_ids[s:e] = top.values, top.indices
            del z
    ctx.save_for_backward(hidden_NH, weight_VH, ids_N, gather_ids_NK if K else None, lse_N)
    ctx.temperature, ctx.chunk_size, ctx.K, ctx.cdt = temperature, chunk_size, K, cdt
    ctx.mark_non_differentiable(top_ids, top_vals)
    return logp_N, lse_N, gathered_NK, top_ids, top_vals


def _fused_backward(ctx, g_logp_N, g_lse_N, g_gathered_NK, _g_ids, _g_vals):
    hidden_NH, weight_VH, ids_N, gather_ids_NK, lse_N = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    N, dev, cdt = hidden_NH.shape[0], hidden_NH.device, ctx.cdt
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    g_logp_N = zeros if g_logp_N is None else g_logp_N.float()
    g_lse_N = zeros if g_lse_N is None else g_lse_N.float()
    use_gather = ctx.K and g_gathered_NK is not None
    grad_h = torch.empty_like(hidden_NH) if need_h else None
    grad_w = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
    with torch.autocast(dev.type, enabled=False):
        w_VH = _operand(weight_VH, cdt)
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            h = _operand(hidden_NH[s:e], cdt)
            dz = _mm_f32(h, w_VH.T)  # the forward's logits, bit for bit (same operands, same product)
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            dz.sub_(lse_N[s:e, None]).exp_()  # softmax p, in place
            dz.mul_((g_lse_N[s:e] - g_logp_N[s:e])[:, None])
            dz.scatter_add_(1, ids_N[s:e, None], g_logp_N[s:e, None])
            if use_gather:
                dz.scatter_add_(1, gather_ids_NK[s:e], g_gathered_NK[s:e].float())
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            dz_c = _operand(dz, cdt)
            if need_h:
                grad_h[s:e] = _mm_f32(dz_c, w_VH)
            if need_w:
                _mm_f32(dz_c.T, h, acc=grad_w)
            del dz, dz_c
    if need_w:
        grad_w = grad_w.to(weight_VH.dtype)
    return grad_h, grad_w, None, None, None, None, None


def _make_fused(device_type: str) -> type[torch.autograd.Function]:
    """The fused autograd function for one device type. ``custom_fwd`` / ``custom_bwd`` run the backward
    under the autocast state of the forward (not whatever is ambient when ``.backward()`` is called), so
    the recomputed logits are the forward's and the compute dtype is the same in both."""

    class _FusedLogprobs(torch.autograd.Function):
        """logits = h W^T / temperature chunk by chunk; backward recomputes the chunk's logits.

        With ``z`` the logits of one position, ``y`` its target and ``S`` the gather ids:
        ``logp = z_y − lse(z)``, ``gathered_k = z_{S_k}``, so
        ``dL/dz = p·(g_lse − g_logp) + g_logp·onehot(y) + Σ_k g_gathered_k·onehot(S_k)``, ``p = softmax(z)``.
        ``z`` is float32 whatever the dtype of ``h`` and ``W``: the product runs in the compute dtype
        (autocast's, else the inputs') with a float32 result, and the log-softmax is float32.
        """

        forward = staticmethod(torch.amp.custom_fwd(_fused_forward, device_type=device_type))
        backward = staticmethod(torch.amp.custom_bwd(_fused_backward, device_type=device_type))

    _FusedLogprobs.__qualname__ = f"_FusedLogprobs[{device_type}]"
    return _FusedLogprobs


_FUSED: dict[str, type[torch.autograd.Function]] = {}  # device type -> its fused autograd function


def _fused_fn(device_type: str) -> type[torch.autograd.Function]:
    if device_type not in _FUSED:
        _FUSED[device_type] = _make_fused(device_type)
    return _FUSED[device_type]


def fused_logprobs(hidden_BTH: torch.Tensor, weight_VH: torch.Tensor, ids_BT: torch.Tensor, *,
                   gather_ids_BTK: torch.Tensor | None = None, topk: int = 0, temperature: float = 1.0,
                   chunk_size: int = 1024) -> LogprobOutput:
    """Log-probs of ``ids_BT`` (and optional gathered logits / top-k) from hidden states and LM head.

    Args:
        hidden_BTH: final (normed) hidden states that predict each position, ``[B,T,H]``.
        weight_VH: LM head weight ``[V,H]`` (logits ``z = h W^T``; no bias, as in Qwen3 / Llama).
        ids_BT: token whose log-prob is wanted at each position ``[B,T]`` (any valid id on padding).
        gather_ids_BTK: optional ids ``[B,T,K]`` at which to return the logits (with gradient).
        topk: if > 0, also return this model's top-``topk`` ids and logits (no gradient).
        temperature: logits are divided by it (docs/methods.md §0 uses 1.0).
        chunk_size: positions per chunk; peak extra memory is about ``2 * chunk_size * V * 4`` bytes.

    Returns a :class:`LogprobOutput` of float32 tensors; ``logp_BT = z_y − logsumexp(z)`` (§0).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H = hidden_BTH.shape
    if weight_VH.shape[1] != H:
        raise ValueError(f"hidden size {H} does not match LM head weight {tuple(weight_VH.shape)}")
    if ids_BT.shape != (B, T):
        raise ValueError(f"ids_BT must be [B,T]=({B},{T}), got {tuple(ids_BT.shape)}")
    g = gather_ids_BTK.reshape(B * T, -1) if gather_ids_BTK is not None else None
    logp, lse, gath, top_ids, top_vals = _fused_fn(hidden_BTH.device.type).apply(
        hidden_BTH.reshape(B * T, H), weight_VH, ids_BT.reshape(-1).long(), g, int(topk),
        float(temperature), int(chunk_size))
    return LogprobOutput(
        logp.view(B, T), lse.view(B, T),
        gath.view(B, T, -1) if g is not None else None,
        top_ids.view(B, T, topk) if topk else None,
        top_vals.view(B, T, topk) if topk else None,
    )


def logprobs_from_logits(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, *,
                         gather_ids_BTK: torch.Tensor | None = None, topk: int = 0,
                         temperature: float = 1.0, chunk_size: int = 1024) -> LogprobOutput:
    """Same outputs as :func:`fused_logprobs` from already-computed logits ``[B,T,V]`` (any dtype).

    Works chunk by chunk in float32 so a bf16 ``[B,T,V]`` is never copied whole to float32; autograd
    keeps one float32 chunk per chunk for backward, so prefer :func:`fused_logprobs` for training.
    """
    B, T, V = logits_BTV.shape
    outs = []
    flat = logits_BTV.reshape(B * T, V)
    ids = ids_BT.reshape(-1).long()
    g = gather_ids_BTK.reshape(B * T, -1) if gather_ids_BTK is not None else None
    for s in range(0, B * T, chunk_size):
        z = flat[s:s + chunk_size].float()
        if temperature != 1.0:
            z = z / temperature
        outs.append(_chunk_stats(z, ids[s:s + chunk_size], g[s:s + chunk_size] if g is not None else None,
                                 topk))
    if not outs:
        empty = logits_BTV.new_zeros(B, T, dtype=torch.float32)
        return LogprobOutput(empty, empty.clone(), None, None, None)
    logp = torch.cat([o[0] for o in outs]).view(B, T)
    lse = torch.cat([o[1] for o in outs]).view(B, T)
    gath = torch.cat([o[2] for o in outs]).view(B, T, -1) if g is not None else None
    top_ids = torch.cat([o[3].indices for o in outs]).view(B, T, topk) if topk else None
    top_vals = torch.cat([o[3].values for o in outs]).view(B, T, topk) if topk else None
    return LogprobOutput(logp, lse, gath, top_ids, top_vals)


def naive_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, *, topk: int = 0,
                   temperature: float = 1.0) -> LogprobOutput:
    """Reference implementation: one float32 ``log_softmax`` over the whole ``[B,T,V]`` tensor."""
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    logp = logp_BTV.gather(-1, ids_BT.long()[..., None]).squeeze(-1)
    lse = torch.logsumexp(logits_BTV.float() / temperature, dim=-1)
    top = (logits_BTV.float() / temperature).topk(topk, dim=-1) if topk else None
    return LogprobOutput(logp, lse, None, top.indices if top else None, top.values if top else None)
