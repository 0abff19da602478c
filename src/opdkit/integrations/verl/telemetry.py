"""Gate telemetry as verl metrics (§4: "log gate min / max / std and the mean |δ| every update").

Sums come from :func:`opdkit.gates.drift.drift_stats`. verl aggregates a metric over micro-batches with
its ``AggregationType``: min / max are exact over the mini-batch; ``gate_mean``, ``gate_std`` and
``abs_drift`` are per-micro-batch values averaged by verl (equal to the mini-batch value when
micro-batches hold equal token counts). :func:`hook_metrics` adds the engine hook's mini-batch values,
exact over all micro-batches and data-parallel ranks: ``opdkit/gate_mean_minibatch`` (``Σ g·m / Σ m``, the
mean the batch-scope normalisation divides by), ``opdkit/grad_scale`` and ``opdkit/tokens``.
"""

from __future__ import annotations

import math

import torch
from verl.utils.metric import AggregationType, Metric

from opdkit.gates.drift import drift_stats


def gate_metrics(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor,
                 gate_BT: torch.Tensor | None) -> dict:
    """``opdkit/*`` metrics of one micro-batch; without a gate only the drift ``|δ|``."""
    g_BT = gate_BT if gate_BT is not None else mask_BT.to(torch.float32)
    s = drift_stats(logp_BT, logp_old_BT, mask_BT, g_BT)
    n = max(int(s["token_count"]), 1)
    out = {"opdkit/abs_drift": Metric(AggregationType.MEAN, float(s["abs_drift_sum"]) / n)}
    if gate_BT is None or int(s["token_count"]) == 0:
        return out
    mean = float(s["gate_sum"]) / n
    out.update({
        "opdkit/gate_mean": Metric(AggregationType.MEAN, mean),
        "opdkit/gate_std": Metric(AggregationType.MEAN, math.sqrt(max(float(s["gate_sq_sum"]) / n - mean**2, 0.0))),
        "opdkit/gate_min": Metric(AggregationType.MIN, float(s["gate_min"])),
        "opdkit/gate_max": Metric(AggregationType.MAX, float(s["gate_max"])),
    })
    return out


def hook_metrics(stats: dict) -> dict:
    """The engine hook's mini-batch telemetry (:func:`~.denominator.finish_mini_batch`) as verl metrics,
    one value per mini-batch (a list, as verl's per-micro-batch metrics are)."""
    names = {"grad_scale": "opdkit/grad_scale", "tokens": "opdkit/tokens", "gate_mean": "opdkit/gate_mean_minibatch"}
    return {names[k]: [Metric(AggregationType.MEAN, float(v))] for k, v in stats.items()}
