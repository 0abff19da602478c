"""Divergence detection: a wrecked run is loud even when it produces no NaN.

Non-finite updates are already skipped (and a streak of them stops the run, ``train.max_bad_updates``).
What skipping cannot see is a run that stays finite but is wrecked, as a far too high learning rate
leaves it: the optimizer pushes the logits so far that the softmax saturates, the gradient norm is
then *exactly* 0.0 update after update, and the loss (or the sampled reverse KL of the next rollouts)
jumps by a large factor over its running mean. The monitor checks three signals:

* ``grad_norm == 0.0`` exactly for ``zero_grad_updates`` updates in a row (a real update with tokens
  in it almost never has an exactly zero gradient; a saturated network has one every time);
* ``|loss|`` of an update above ``factor`` x the running mean of the previous ``window`` updates;
* the sampled reverse KL of a rollout step above ``factor`` x the running mean of previous steps.

A jump must also exceed ``min_jump`` in absolute terms (nats/token), so a loss going from 1e-4 to 1e-3
near convergence is not a divergence. Nothing is flagged before ``warmup`` values have been seen.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class DivergenceMonitor:
    """Feed it every update's and every rollout step's metrics; it returns a warning string or None."""

    factor: float = 10.0
    zero_grad_updates: int = 3
    min_jump: float = 1.0
    window: int = 10
    warmup: int = 3
    _zero_streak: int = 0
    _loss: deque = field(default_factory=deque)
    _rkl: deque = field(default_factory=deque)

    def _jump(self, hist: deque, value: float, what: str) -> str | None:
        ref = sum(hist) / len(hist) if hist else 0.0
        flagged = (len(hist) >= self.warmup and math.isfinite(value) and value > self.factor * ref
                   and value - ref > self.min_jump)
        if math.isfinite(value) and not flagged:  # a flagged value does not become the new normal
            hist.append(value)
            while len(hist) > self.window:
                hist.popleft()
        if flagged:
            return f"{what} jumped to {value:.3g} from a running mean of {ref:.3g} ({value / max(ref, 1e-12):.0f}x)"
        return None

    def update(self, metrics: dict) -> str | None:
        """One optimizer update's metrics (``loss``, ``grad_norm``, ``skipped``, ``tokens``)."""
        if metrics.get("skipped"):
            return None  # non-finite updates have their own counter
        if metrics.get("tokens", 1.0) > 0 and metrics["grad_norm"] == 0.0:
            self._zero_streak += 1
        else:
            self._zero_streak = 0
        if self.zero_grad_updates and self._zero_streak >= self.zero_grad_updates:
            return (f"the gradient norm was exactly 0 for {self._zero_streak} updates in a row "
                    f"(a saturated student)")
        return self._jump(self._loss, abs(float(metrics["loss"])), "the loss")

    def step(self, record: dict) -> str | None:
        """One rollout step's record (``sampled_rkl``)."""
        value = record.get("sampled_rkl")
        if value is None:
            return None
        return self._jump(self._rkl, float(value), "the sampled reverse KL of the rollouts")

    def state(self) -> dict:
        return {"zero_streak": self._zero_streak, "loss": list(self._loss), "rkl": list(self._rkl)}

    def load_state(self, state: dict) -> None:
        self._zero_streak = int(state.get("zero_streak", 0))
        self._loss, self._rkl = deque(state.get("loss", [])), deque(state.get("rkl", []))
