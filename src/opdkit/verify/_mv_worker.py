"""math-verify worker process.

Run as a script (``python _mv_worker.py``) by :mod:`opdkit.verify._pool`. It deliberately imports
nothing from opdkit (only the standard library and math_verify) so that it starts fast and is
independent of whatever heavy modules the parent process has loaded.

Protocol: JSON Lines. After start-up the worker writes ``{"ready": true}``. Each request is
``{"id": int, "p": prediction, "g": gold, "t": seconds}`` (strings already wrapped as LaTeX, e.g.
``\\boxed{...}``); each reply is ``{"id": int, "r": reason}`` with reason one of
``correct``, ``mismatch``, ``parse_error``, ``timeout``.

Time bounds: in this process math-verify runs in the main thread, so a SIGALRM interval timer
(``t`` seconds, sub-second resolution) interrupts it ("soft" timeout). Work that never returns
to the interpreter (e.g. a huge integer power inside C code) cannot be interrupted that way; the
parent kills the whole process after its own deadline ("hard" timeout).

Importing this module has no side effects; :func:`check` is also used in-process as a fallback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from functools import lru_cache

CORRECT = "correct"
MISMATCH = "mismatch"
PARSE_ERROR = "parse_error"
TIMEOUT = "timeout"

_configs = None


class SoftTimeout(BaseException):
    """Raised by the interval timer. A BaseException so that `except Exception` in
    math-verify/sympy does not swallow it."""


def _get_configs():
    global _configs
    if _configs is None:
        import math_verify.grader
        import math_verify.parser
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        # We pass timeouts of None (we bound time ourselves); silence math-verify's one-time
        # warning about that.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        _configs = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return _configs


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    return tuple(parse(gold, _get_configs(), parsing_timeout=None))


def check(pred: str, gold: str) -> str:
    """Compare wrapped prediction and gold with math-verify. Does not bound time itself."""
    from math_verify import parse, verify

    cfg = _get_configs()
    g = list(_parse_gold(gold))
    p = parse(pred, cfg, parsing_timeout=None)
    if not p:
        return PARSE_ERROR
    return CORRECT if verify(g, p, timeout_seconds=None) else MISMATCH


# --------------------------------------------------------------------------- process main

_armed = False


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker process
    if _armed:
        raise SoftTimeout()


def _limit_memory() -> None:
    """Cap the address space so that runaway big-number arithmetic fails with MemoryError
    (caught by math-verify -> "mismatch"/"parse_error") instead of exhausting the machine."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    mb = int(os.environ.get("OPDKIT_VERIFY_MAX_MEM_MB", "4096") or 0)
    if mb <= 0:
        return
    limit = mb * 1024 * 1024
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = max(limit, current + 1024 * 1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent's spawning thread exits (best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        return
    if os.getppid() == 1:  # parent already gone
        os._exit(0)


def main() -> None:  # pragma: no cover - runs in the worker process
    global _armed
    # Protocol output goes to a private copy of stdout; anything libraries print goes to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _limit_memory()

    import logging

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)

    has_timer = hasattr(signal, "setitimer")
    if has_timer:
        signal.signal(signal.SIGALRM, _on_alarm)

    check("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}")  # warm up imports and the LaTeX parser
    proto.write('{"ready": true}\n')
    proto.flush()

    for line in sys.stdin:
        try:
            req = json.loads(line)
            rid, pred, gold, t = req["id"], req["p"], req["g"], float(req["t"])
        except (ValueError, KeyError, TypeError):
            continue
        result = None
        try:
            try:
                _armed = True
                if has_timer:
                    signal.setitimer(signal.ITIMER_REAL, max(t, 0.001))
                result = check(pred, gold)
                _armed = False
            finally:
                _armed = False
                if has_timer:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except SoftTimeout:
            result = result or TIMEOUT
        except Exception:
            result = PARSE_ERROR
        proto.write(json.dumps({"id": rid, "r": result}) + "\n")
        proto.flush()


if __name__ == "__main__":  # pragma: no cover
    # Do not let this directory shadow anything: running a script puts its folder first on sys.path.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path.pop(0)
    main()
