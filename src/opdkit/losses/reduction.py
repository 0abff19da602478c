"""Reduction of per-position losses to a scalar (docs/methods.md §3): the only code in opdkit that divides.

A loss is ``numerator / denominator``. The numerator is a sum over the sequences of one micro-batch, so
numerators of micro-batches (and processes) add up; the denominator is a function of three global
counts, :func:`reduction_stats`, summed over the whole optimizer-step batch (all micro-batches and
all processes) before dividing. An update therefore does not depend on how the batch is split.

Modes (``w`` are optional detached per-token weights, e.g. drift gates §4; ``m`` the mask;
``n_i = Σ_t m_it``; ``N`` rows with ``n_i > 0``; ``w̄ = Σ w m / Σ m`` over the step batch):

- ``token-mean``:          ``Σ_it w l m / Σ_it w m``   (without weights: ``/ Σ m``; the paper's mode)
- ``seq-mean-token-mean``: ``Σ_i (Σ_t w l m / n_i) / (N · w̄)``
- ``seq-mean-token-sum``:  ``Σ_it w l m / (N · w̄)``
- ``constant``:            ``Σ_it w l m / (C · w̄)``   (Dr.GRPO style, C fixed)

Dividing by ``w̄`` is the mean-normalisation of §4 step 5 (``g̃ = g / mean_{m=1}(g)``) done over the step
batch: for ``token-mean`` it gives the weighted mean ``Σ g l / Σ g``. Weights already normalised per
sequence are passed with ``normalize_weights=False``.

Typical use with gradient accumulation::

    stats = sum(reduction_stats(mb.mask, gate) for mb in microbatches)   # all-reduce across processes
    denom = loss_denominator(stats, mode)
    for mb in microbatches:
        (loss_numerator(loss_BT, mb.mask, mode, weights_BT=gate) / denom).backward()

or, when the weights are only known during each micro-batch's forward, backward the numerators and
scale the accumulated gradients by ``1 / denom`` at the end (the denominator is a constant).
"""

from __future__ import annotations

import torch

REDUCTION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")


def _check_mode(mode: str) -> None:
    if mode not in REDUCTION_MODES:
        raise ValueError(f"unknown reduction mode {mode!r}; valid: {', '.join(REDUCTION_MODES)}")


def reduction_stats(mask_BT: torch.Tensor, weights_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Global counts ``[3] = (Σ m, rows with Σ_t m > 0, Σ w m)`` in float64; sum them over micro-batches.

    Without weights the third entry equals the first.
    """
    m = mask_BT.to(torch.float64)
    tokens = m.sum()
    seqs = (m.sum(dim=-1) > 0).to(torch.float64).sum()
    wsum = (weights_BT.detach().to(torch.float64) * m).sum() if weights_BT is not None else tokens
    return torch.stack([tokens, seqs, wsum])


def loss_numerator(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str = "token-mean", *,
                   weights_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable numerator of ``mode`` for one micro-batch (a sum over its rows), float32 scalar.

    ``loss_BT`` [B,T] per-position losses; ``mask_BT`` [B,T]; ``weights_BT`` [B,T] detached weights.
    Masked positions contribute exactly 0, whatever ``loss_BT`` holds there.
    """
    _check_mode(mode)
    m = mask_BT.to(torch.bool)
    l = loss_BT.float()
    if weights_BT is not None:
        l = l * weights_BT.detach().float()
    l = torch.where(m, l, torch.zeros((), dtype=l.dtype, device=l.device))
    if mode == "seq-mean-token-mean":
        n_B = m.sum(dim=-1).clamp_min(1).to(l.dtype)
        return (l.sum(dim=-1) / n_B).sum()
    return l.sum()


def loss_denominator(stats: torch.Tensor, mode: str = "token-mean", *, constant: float | None = None,
                     weighted: bool = False) -> torch.Tensor:
    """Denominator of ``mode`` from step-global :func:`reduction_stats` (float32 scalar, ≥ tiny).

    ``weighted`` divides by the mean weight ``w̄`` too (§4 step 5, batch scope).
    """
    _check_mode(mode)
    tokens, seqs, wsum = stats.to(torch.float64).unbind()
    if mode == "token-mean":
        d = wsum if weighted else tokens
    else:
        if mode == "constant":
            if constant is None or constant <= 0:
                raise ValueError("reduction mode 'constant' needs constant > 0 (e.g. max response tokens)")
            base = torch.as_tensor(float(constant), dtype=torch.float64)
        else:
            base = seqs
        d = base * (wsum / tokens.clamp_min(1e-300)) if weighted else base
    return d.clamp_min(1e-12).float()


def reduce_loss(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str = "token-mean", *,
                weights_BT: torch.Tensor | None = None, normalize_weights: bool = True,
                constant: float | None = None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-position losses ``[B,T]`` to a scalar (§3), optionally weighted (§4 steps 5-6).

    Args:
        loss_BT: per-position loss; mask_BT: 1 on valid response tokens.
        mode: one of :data:`REDUCTION_MODES`.
        weights_BT: detached per-token weights (drift gates); the gradient never flows through them.
        normalize_weights: divide by the mean weight over the step batch (``g / mean(g)``); set False
            when the weights are already normalised (e.g. per sequence).
        constant: the divisor of mode ``constant``.
        stats: step-global :func:`reduction_stats` (summed over micro-batches / processes). Omitted:
            this batch is the whole step.
    """
    if stats is None:
        stats = reduction_stats(mask_BT, weights_BT)
    num = loss_numerator(loss_BT, mask_BT, mode, weights_BT=weights_BT)
    den = loss_denominator(stats, mode, constant=constant,
                           weighted=weights_BT is not None and normalize_weights)
    return num / den.to(num.device)
