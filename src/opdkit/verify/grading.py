"""Answer grading: extract the final answer, compare it with the reference, return a Verdict.

Pipeline for one (response, reference) pair:

1. :func:`~opdkit.verify.extract.extract_answer` (linear string scan) -> ``no_answer`` if none.
2. Guards: answers longer than :data:`MAX_ANSWER_CHARS` or nested deeper than
   :data:`MAX_BRACE_DEPTH` -> ``parse_error`` (no model answer legitimately needs that).
3. Fast paths, in this process: both sides plain integers (leading zeros, ``+``, spaces,
   ``1,000`` / ``1{,}000`` thousands separators, ``5.0``) -> compared as digit strings; textually
   identical answers (modulo whitespace runs) -> ``correct``.
4. Everything else goes to math-verify (``parse`` + ``verify``) inside a worker process with a
   hard time limit (see :mod:`opdkit.verify._pool`) -> ``correct`` / ``mismatch`` /
   ``parse_error`` (prediction unparseable) / ``timeout``.

Model output is never evaluated as code here; the only parser that sees it is math-verify's.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from . import _mv_worker, _pool
from .extract import brace_depth, braces_balanced, extract_answer

__all__ = [
    "CORRECT",
    "NO_ANSWER",
    "PARSE_ERROR",
    "TIMEOUT",
    "MISMATCH",
    "REASONS",
    "DEFAULT_EXTRACTORS",
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
    "Verdict",
    "grade",
    "grade_many",
    "canonical_int",
    "shutdown_workers",
]

CORRECT = "correct"
NO_ANSWER = "no_answer"
PARSE_ERROR = "parse_error"
TIMEOUT = "timeout"
MISMATCH = "mismatch"
REASONS = (CORRECT, NO_ANSWER, PARSE_ERROR, TIMEOUT, MISMATCH)

DEFAULT_EXTRACTORS = ("boxed", "answer_line")

#: Extracted answers longer than this are not parsed (reason "parse_error").
MAX_ANSWER_CHARS = 1000
#: Extracted answers with braces nested deeper than this are not parsed ("parse_error").
MAX_BRACE_DEPTH = 32

_CACHE_SIZE = 65536


@dataclass(frozen=True)
class Verdict:
    """Outcome of grading one response. `reward` is 1 iff `reason == "correct"`."""

    reward: int
    extracted: str | None
    reason: str


# --------------------------------------------------------------------------- integers

_SPACING = (("{,}", ","), ("\\!", ""), ("\\,", " "), ("\\ ", " "), ("\\;", " "), ("\\:", " "), ("~", " "))


def _ascii_digits(s: str) -> bool:
    return bool(s) and s.isascii() and s.isdigit()


def canonical_int(text: str) -> str | None:
    """Canonical form of a plain integer (``"-12"``, ``"0"``) or None if `text` is not one.

    Accepts surrounding whitespace, a ``+``/``-`` sign, leading zeros, thousands separators
    (``1,000``, ``1 000``, ``1{,}000``, ``1\\,000``; groups of exactly three digits) and a zero
    fractional part (``27.0``, ``5.``). Pure string work: no int() conversion, any length.
    """
    s = text.strip()
    if not s:
        return None
    for old, new in _SPACING:
        if old in s:
            s = s.replace(old, new)
    s = s.strip()
    sign = ""
    if s[:1] in ("+", "-", "\u2212"):
        sign = "" if s[0] == "+" else "-"
        s = s[1:].lstrip()
    if "." in s:
        s, _, frac = s.partition(".")
        if frac.strip("0"):
            return None
    if _ascii_digits(s):
        digits = s
    else:
        sep = "," if "," in s else " " if " " in s else None
        if sep is None:
            return None
        groups = s.split(sep)
        if not (1 <= len(groups[0]) <= 3) or not all(_ascii_digits(g) for g in groups):
            return None
        if any(len(g) != 3 for g in groups[1:]):
            return None
        digits = "".join(groups)
    digits = digits.lstrip("0") or "0"
    if digits == "0":
        sign = ""
    return sign + digits


def _squash(s: str) -> str:
    return " ".join(s.split())


def _wrap(ans: str) -> str:
    """LaTeX form math-verify's extractor finds: a box, or inline math if braces are unbalanced."""
    return "\\boxed{" + ans + "}" if braces_balanced(ans) else "$" + ans + "$"


# --------------------------------------------------------------------------- result cache

_cache: OrderedDict[tuple[str, str], str] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_get(key: tuple[str, str]) -> str | None:
    with _cache_lock:
        r = _cache.get(key)
        if r is not None:
            _cache.move_to_end(key)
        return r


def _cache_put(key: tuple[str, str], reason: str) -> None:
    if reason == TIMEOUT:  # may depend on load; never cache
        return
    with _cache_lock:
        _cache[key] = reason
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


# --------------------------------------------------------------------------- grading


def _verdict(extracted: str | None, reason: str) -> Verdict:
    return Verdict(1 if reason == CORRECT else 0, extracted, reason)


def _prepare(response, reference: str, extractors, fast_path: bool = True) -> Verdict | tuple[str, str, str]:
    """A final Verdict, or (extracted, wrapped prediction, wrapped reference) for math-verify."""
    extracted = extract_answer(response, extractors) if isinstance(response, str) else None
    if extracted is None:
        return _verdict(None, NO_ANSWER)
    if len(extracted) > MAX_ANSWER_CHARS or brace_depth(extracted) > MAX_BRACE_DEPTH:
        return _verdict(extracted, PARSE_ERROR)
    ref = reference.strip()
    if not fast_path:
        return extracted, _wrap(extracted), _wrap(ref)
    pred_int = canonical_int(extracted)
    if pred_int is not None:
        ref_int = canonical_int(ref)
        if ref_int is not None:
            return _verdict(extracted, CORRECT if pred_int == ref_int else MISMATCH)
    if _squash(extracted) == _squash(ref):
        return _verdict(extracted, CORRECT)
    return extracted, _wrap(extracted), _wrap(ref)


def _check_many(items: list[tuple[int, str, str]], timeout_s: float) -> dict[int, str]:
    """Run math-verify on (index, pred, gold) items through one worker process."""
    out: dict[int, str] = {}
    try:
        worker = _pool.POOL.acquire()
    except _pool.WorkerUnavailable:
        worker = None  # in-process fallback
    try:
        for idx, pred, gold in items:
            out[idx], worker = _check_one(worker, pred, gold, timeout_s)
    finally:
        if worker is not None:
            _pool.POOL.release(worker)
    return out


def _replace(worker: _pool.Worker) -> _pool.Worker | None:
    try:
        return _pool.POOL.replace(worker)
    except _pool.WorkerUnavailable:
        return None


def _check_one(
    worker: _pool.Worker | None, pred: str, gold: str, timeout_s: float
) -> tuple[str, _pool.Worker | None]:
    """(reason, worker to use next). A worker that missed its deadline is killed and replaced."""
    for _attempt in range(2):
        if worker is None or not worker.wait_ready(_pool.STARTUP_TIMEOUT_S):
            if worker is not None:
                worker.kill()
            return _pool.check_in_thread(pred, gold, timeout_s), None
        try:
            return worker.request(pred, gold, timeout_s), worker
        except _pool.WorkerTimeout:
            return TIMEOUT, _replace(worker)
        except _pool.WorkerDied:
            # Died before or while handling this input: retry once on a fresh worker. If that
            # one dies too, the input is to blame.
            worker = _replace(worker)
    return PARSE_ERROR, worker


def grade_many(
    responses: Sequence[str],
    references: Sequence[str] | str,
    *,
    timeout_s: float = 5.0,
    extractors: Sequence[str] = DEFAULT_EXTRACTORS,
    num_workers: int = 1,
    fast_path: bool = True,
) -> list[Verdict]:
    """Grade many responses; `references` is a parallel list or one reference for all.

    Pairs that need math-verify go through `num_workers` worker processes (reused across calls).
    Each such pair is bounded by `timeout_s` (plus a small kill grace), from any thread.
    `fast_path=False` sends every extracted answer to math-verify (for benchmarking/auditing)
    and bypasses the result cache.
    """
    if timeout_s is None or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if isinstance(references, str):
        refs = [references] * len(responses)
    else:
        refs = list(references)
        if len(refs) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(refs)} references")
    refs = [_reference_str(r) for r in refs]

    results: list[Verdict | None] = [None] * len(responses)
    pending: list[tuple[int, str, str]] = []
    extracted_at: dict[int, str] = {}
    for i, (resp, ref) in enumerate(zip(responses, refs, strict=True)):
        prep = _prepare(resp, ref, extractors, fast_path)
        if isinstance(prep, Verdict):
            results[i] = prep
            continue
        extracted, pred, gold = prep
        cached = _cache_get((pred, gold)) if fast_path else None
        if cached is not None:
            results[i] = _verdict(extracted, cached)
        else:
            extracted_at[i] = extracted
            pending.append((i, pred, gold))

    if pending:
        n = max(1, min(int(num_workers), len(pending)))
        if n == 1:
            reasons = _check_many(pending, timeout_s)
        else:
            chunks = [pending[k::n] for k in range(n)]
            reasons = {}
            with concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="opdkit-grade") as ex:
                for part in ex.map(lambda c: _check_many(c, timeout_s), chunks):
                    reasons.update(part)
        for i, pred, gold in pending:
            reason = reasons.get(i, PARSE_ERROR)
            if reason not in (CORRECT, MISMATCH, PARSE_ERROR, TIMEOUT):
                reason = PARSE_ERROR
            _cache_put((pred, gold), reason)
            results[i] = _verdict(extracted_at[i], reason)
    return results  # type: ignore[return-value]


def grade(
    response: str,
    reference: str,
    *,
    timeout_s: float = 5.0,
    extractors: Sequence[str] = DEFAULT_EXTRACTORS,
) -> Verdict:
    """Grade one response against a reference answer (see module docstring)."""
    return grade_many([response], [reference], timeout_s=timeout_s, extractors=extractors)[0]


def _reference_str(ref) -> str:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        return str(int(ref)) if float(ref).is_integer() else str(ref)
    raise TypeError(f"reference answers must be strings or numbers, got {type(ref).__name__}")


def shutdown_workers() -> None:
    """Stop idle worker processes now (they are also stopped at interpreter exit)."""
    _pool.POOL.shutdown()


# math-verify's reasons as seen by the worker are the same strings as ours.
assert (_mv_worker.CORRECT, _mv_worker.MISMATCH, _mv_worker.PARSE_ERROR, _mv_worker.TIMEOUT) == (
    CORRECT,
    MISMATCH,
    PARSE_ERROR,
    TIMEOUT,
)
