"""Exact reduction denominator across verl micro-batches and data-parallel ranks (methods.md §3-§4 step 5).

verl's token-mean divides every micro-batch's ``Σ l·m`` by ``batch_num_tokens`` (the response tokens of
the whole mini-batch, all-reduced over data-parallel ranks) before backward. opdkit's reduction divides
``Σ w·l·m_eff`` by ``D``: ``Σ g·m_eff`` for a batch-normalised gate (§4 step 5, ``g̃ = g / mean g``), or
``Σ m_eff`` otherwise, where ``m_eff`` is the response mask after special-token masking (§2.4). Both are
sums over the mini-batch, but ``g`` depends on the current student, so ``D`` is known only after the
last micro-batch's forward. The denominator is a constant of the update, hence (as in opdkit's own
trainer, :mod:`opdkit.losses.reduction`) the gradient accumulated with verl's divisor is rescaled once:

    grad  ←  grad · batch_num_tokens / D,      D = all_reduce_sum(Σ_micro-batches d_mb)

which makes the step's gradient exactly ∇ (Σ w·l·m_eff / D). :class:`DenominatorAccumulator` collects the
``d_mb``; the engine hook (:mod:`opdkit.integrations.verl.engine`) all-reduces and rescales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class DenominatorAccumulator:
    """Per-process running sums of one mini-batch (float64): ``[Σ m_eff, Σ w·m_eff]`` and how many
    opdkit micro-batches added to them. ``weighted``: the denominator is the weighted sum (batch-scope gate)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64)
        self.count = 0
        self.weighted = False

    def add(self, tokens: torch.Tensor, weighted_tokens: torch.Tensor | None = None) -> None:
        """Add one micro-batch: ``Σ m_eff`` and, for a batch-scope gate, ``Σ w·m_eff`` (else it equals ``Σ m_eff``)."""
        t = tokens.detach().to("cpu", torch.float64)
        w = t if weighted_tokens is None else weighted_tokens.detach().to("cpu", torch.float64)
        self._sums = self._sums + torch.stack([t, w])
        self.count += 1
        self.weighted = self.weighted or weighted_tokens is not None

    def total(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[Σ m_eff, Σ w·m_eff]`` of this process (all-reduce it over the data-parallel group)."""
        return self._sums.clone().to(device)


ACCUMULATOR = DenominatorAccumulator()


def gradient_scale(batch_num_tokens: float, denominator: torch.Tensor | float) -> float:
    """``batch_num_tokens / D``: the factor turning verl's divisor into opdkit's (``D`` all-reduced)."""
    d = float(denominator)
    if not d > 0:
        return 0.0  # nothing valid in the mini-batch: its (zero) gradient stays zero
    return float(batch_num_tokens) / d


def rescale_gradients(parameters: Iterable[torch.nn.Parameter], factor: float) -> None:
    """Multiply every accumulated gradient by ``factor`` in place (sharded / DTensor grads included)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(factor)


def finish_mini_batch(parameters: Iterable[torch.nn.Parameter], batch_num_tokens: float,
                      all_reduce: Callable[[torch.Tensor], None] | None = None,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """All-reduce the accumulated sums, rescale the gradients by ``batch_num_tokens / D``, reset.

    Returns the mini-batch telemetry: ``grad_scale`` (the factor), ``tokens`` (``Σ m_eff`` over all ranks) and,
    for a batch-scope gate, ``gate_mean`` (``Σ g·m_eff / Σ m_eff``, exact over the mini-batch). A mini-batch
    that no opdkit loss saw (e.g. verl's own loss under the opdkit engine) is left untouched (factor 1).
    """
    if ACCUMULATOR.count == 0:
        return {}
    sums = ACCUMULATOR.total(device)
    if all_reduce is not None:
        all_reduce(sums)
    tokens, weighted = float(sums[0]), float(sums[1])
    factor = gradient_scale(batch_num_tokens, weighted if ACCUMULATOR.weighted else tokens)
    rescale_gradients(parameters, factor)
    out = {"grad_scale": factor, "tokens": tokens}
    if ACCUMULATOR.weighted and tokens > 0:
        out["gate_mean"] = weighted / tokens
    ACCUMULATOR.reset()
    return out
