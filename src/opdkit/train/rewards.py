"""Verifier rewards of rollouts (registry: name -> fn(responses, answers) -> list[int])."""

from __future__ import annotations

from collections.abc import Callable


def _math(responses: list[str], answers: list[str]) -> list[int]:
    from opdkit.verify import grade_many

    return [v.reward for v in grade_many(responses, answers)]


def _chain(responses: list[str], answers: list[str]) -> list[int]:
    from opdkit.tasks.chain import grade_chain

    return [int(grade_chain(r, a)) for r, a in zip(responses, answers)]


REWARDS: dict[str, Callable[[list[str], list[str]], list[int]] | None] = {
    "math": _math, "chain": _chain, "none": None,
}


def get_reward(name: str):
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)}") from None
