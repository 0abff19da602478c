"""The grader registry: name -> ``fn(responses, answers) -> list[Verdict]``; rewards derive from it.

One registry serves evaluation (``opdkit eval --grader``), training rewards (``rollout.reward``) and
diagnosis (``opdkit diagnose --grader``), so the answer that ``samples.jsonl`` shows as "extracted" is
the one the grader compared. ``math``: :func:`opdkit.verify.grade_many` (last ``\\boxed{}`` / answer line,
math-verify equivalence, time-bounded). ``chain``: the miniature's exact ``answer: N`` line
(:func:`opdkit.tasks.chain.extract_answer`).
"""

from __future__ import annotations

from collections.abc import Callable

from opdkit.verify import CORRECT, MISMATCH, NO_ANSWER, Verdict

Grader = Callable[[list[str], list[str]], list[Verdict]]
RewardFn = Callable[[list[str], list[str]], list[float]]


def _math(responses: list[str], answers: list[str]) -> list[Verdict]:
    from opdkit.verify import grade_many

    return grade_many(responses, answers)


def _chain(responses: list[str], answers: list[str]) -> list[Verdict]:
    from opdkit.tasks.chain import extract_answer, grade_chain

    out = []
    for r, a in zip(responses, answers):
        ok = int(grade_chain(r, a))
        got = extract_answer(r)
        reason = CORRECT if ok else (NO_ANSWER if got is None else MISMATCH)
        out.append(Verdict(reward=ok, extracted=got, reason=reason))
    return out


GRADERS: dict[str, Grader] = {"math": _math, "chain": _chain}
#: ``rollout.reward`` values: every grader, or ``none`` (no verifier during training).
REWARD_CHOICES = (*GRADERS, "none")


def get_grader(name: str) -> Grader:
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; valid: {', '.join(GRADERS)}") from None


def resolve_grader(grader: str | Callable, *, chain: bool) -> tuple[str, Callable]:
    """``(name, fn)`` from a registered name, ``auto`` (chain for chain problems, else math) or a function."""
    if callable(grader):
        return getattr(grader, "__name__", "custom"), grader
    name = ("chain" if chain else "math") if grader == "auto" else grader
    return name, get_grader(name)


def as_reward_fn(grader: str | Callable) -> RewardFn:
    """``fn(responses, answers) -> rewards`` from a grader name or a function returning verdicts or floats."""
    fn = get_grader(grader) if isinstance(grader, str) else grader

    def rewards(responses: list[str], answers: list[str]) -> list[float]:
        return [float(getattr(v, "reward", v)) for v in fn(responses, answers)]

    return rewards


def reward_fn(name: str) -> RewardFn | None:
    """The training reward of ``rollout.reward``: a grader's rewards, or None for ``none``."""
    if name == "none":
        return None
    if name not in GRADERS:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARD_CHOICES)}")
    return as_reward_fn(name)
