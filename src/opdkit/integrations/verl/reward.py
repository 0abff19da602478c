"""verl reward function wired to opdkit's verifier (``reward.custom_reward_function``).

``reward.custom_reward_function.path=pkg://opdkit.integrations.verl.reward`` and
``reward.custom_reward_function.name=compute_score``. The score is :func:`opdkit.verify.grade`'s binary
reward (the answer extracted from ``\\boxed{}`` or an answer line, checked with math-verify), the same
verifier opdkit's trainer, SG-OPD and ``opdkit eval`` use.
"""

from __future__ import annotations

from opdkit.verify import grade


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl's reward signature; returns ``{"score": 0.0 | 1.0, "acc": 0.0 | 1.0}``."""
    v = grade(solution_str, str(ground_truth))
    return {"score": float(v.reward), "acc": float(v.reward)}
