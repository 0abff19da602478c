"""Answer verification: extract a final answer from a response and grade it against a reference.

Public API::

    from opdkit.verify import grade, grade_many, extract_answer, Verdict, CORRECT

    v = grade(response, "\\\\frac{1}{2}")        # Verdict(reward=1, extracted="0.5", reason="correct")
    vs = grade_many(responses, references)    # batched; reuses one worker process

`grade`/`grade_many` never raise on model output and are time-bounded from any thread: math-verify
runs in a separate worker process that is killed when it overruns `timeout_s`.
"""

from .extract import EXTRACTORS, extract_answer, extract_answer_line, extract_boxed
from .grading import (
    CORRECT,
    DEFAULT_EXTRACTORS,
    MAX_ANSWER_CHARS,
    MAX_BRACE_DEPTH,
    MISMATCH,
    NO_ANSWER,
    PARSE_ERROR,
    REASONS,
    TIMEOUT,
    Verdict,
    canonical_int,
    grade,
    grade_many,
    shutdown_workers,
)

__all__ = [
    "CORRECT",
    "DEFAULT_EXTRACTORS",
    "EXTRACTORS",
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
    "MISMATCH",
    "NO_ANSWER",
    "PARSE_ERROR",
    "REASONS",
    "TIMEOUT",
    "Verdict",
    "canonical_int",
    "extract_answer",
    "extract_answer_line",
    "extract_boxed",
    "grade",
    "grade_many",
    "shutdown_workers",
]
