"""Final-answer extraction from model responses.

Everything here is plain string scanning: no regular expression with nested quantifiers,
no recursion, and every function is linear in the length of its input, so hostile
responses (hundreds of kilobytes, thousands of nested braces) cost milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "EXTRACTORS",
    "extract_answer",
    "extract_boxed",
    "extract_answer_line",
    "brace_depth",
    "braces_balanced",
]

# Commands whose argument is the final answer. `\boxed` is what MATH-style prompts ask for;
# `\fbox` is the plain-TeX spelling some models use.
_BOX_COMMANDS = ("\\boxed", "\\fbox")

# A backslash together with the character it escapes, or a bare brace. Each alternative is a
# fixed-width token, so scanning with it is linear.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)

# Markers for the answer-line extractor, matched case-insensitively. When a line has several,
# the text after the right-most one is used.
_LINE_MARKERS = ("final answer is", "answer is", "answer:", "answer\uff1a")
_TRAILERS = ("i hope it is correct.", "i hope it is correct")


def _match_braces(text: str, start: int) -> dict[int, int]:
    """Map the index of every `{` at or after `start` to the index of its matching `}`.

    Escaped braces (`\\{`, `\\}`) are literal characters, not groups. Unclosed braces have no
    entry. One pass with an explicit stack: O(len(text)) time, no recursion.
    """
    stack: list[int] = []
    matches: dict[int, int] = {}
    for m in _BRACE_TOKEN.finditer(text, start):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}":
            if stack:
                matches[stack.pop()] = m.start()
        # an escape sequence such as \{ or \\ is skipped as a unit
    return matches


def _box_positions(text: str) -> list[tuple[int, int]]:
    """(start of command, index just after the command name) for each box command, in order."""
    found: list[tuple[int, int]] = []
    for cmd in _BOX_COMMANDS:
        i = text.find(cmd)
        while i != -1:
            end = i + len(cmd)
            # `\boxedfoo` is a different command; `\\boxed` is a line break followed by "boxed".
            preceded_by_escape = i > 0 and text[i - 1] == "\\"
            if not preceded_by_escape and not (end < len(text) and text[end].isalpha()):
                found.append((i, end))
            i = text.find(cmd, end)
    found.sort()
    return found


def _bare_token(text: str, pos: int) -> str:
    """The argument of `\\boxed 5`-style usage: characters up to whitespace, `$` or end."""
    end = pos
    n = len(text)
    while end < n and not text[end].isspace() and text[end] != "$":
        end += 1
    return text[pos:end].rstrip(".,;")


def extract_boxed(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` / `\\fbox{...}` (nested braces allowed).

    Also accepts the brace-less form `\\boxed 5`. Unclosed boxes (e.g. a truncated response)
    are skipped in favour of the previous complete one. Returns None when there is none.
    """
    if not text:
        return None
    positions = _box_positions(text)
    if not positions:
        return None
    matches = _match_braces(text, positions[0][1])
    n = len(text)
    for _, after in reversed(positions):
        j = after
        while j < n and text[j].isspace():
            j += 1
        if j >= n:
            continue
        if text[j] == "{":
            close = matches.get(j)
            if close is None:
                continue
            content = text[j + 1 : close].strip()
        else:  # brace-less `\boxed 5` (or `\boxed5`): a bare token
            content = _bare_token(text, j)
        if content:
            return content
    return None


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
    return s


def _clean_line_answer(s: str) -> str:
    s = s.strip()
    low = s.lower()
    for trailer in _TRAILERS:
        if low.endswith(trailer):
            s = s[: len(s) - len(trailer)].strip()
            break
    # Markdown emphasis and punctuation left between the marker and the value: "**Answer:** 5".
    s = s.lstrip("*_:\uff1a ").rstrip()
    while s and s[-1] in ".\u3002":
        s = s[:-1].rstrip()
    s = _strip_math_delimiters(s)
    s = s.rstrip("*_ ").lstrip("*_ ")
    while s and s[-1] in ".\u3002":
        s = s[:-1].rstrip()
    return s.strip()


def extract_answer_line(text: str) -> str | None:
    """Value from the last line containing "Answer: X", "answer is X" or "final answer is X".

    If the marker ends its line ("**Answer:**" and the value on the next line), the next
    non-empty line is used. A `\\boxed{}` inside the value is unwrapped.
    """
    if not text:
        return None
    lines = text.splitlines()
    for idx in range(len(lines) - 1, -1, -1):
        line = lines[idx]
        low = line.lower()
        best, best_len = -1, 0
        for marker in _LINE_MARKERS:
            pos = low.rfind(marker)
            if pos > best:
                best, best_len = pos, len(marker)
        if best < 0:
            continue
        rest = line[best + best_len :]
        value = _clean_line_answer(rest)
        if not value:
            # marker at the end of its line: take the next non-empty line, if any
            for nxt in lines[idx + 1 :]:
                if nxt.strip():
                    value = _clean_line_answer(nxt)
                    break
        if value:
            boxed = extract_boxed(value)
            return boxed if boxed is not None else value
    return None


EXTRACTORS = {
    "boxed": extract_boxed,
    "answer_line": extract_answer_line,
}


def extract_answer(response: str, extractors: Sequence[str] = ("boxed", "answer_line")) -> str | None:
    """Final answer of `response` using the named extractors in order; the first hit wins.

    Extractor names: "boxed" (last `\\boxed{}`/`\\fbox{}`), "answer_line" (last
    "Answer: X" / "final answer is X" line). Returns None when no extractor finds an answer.
    """
    if isinstance(extractors, str):
        extractors = (extractors,)
    if not isinstance(response, str):
        return None
    for name in extractors:
        try:
            fn = EXTRACTORS[name]
        except KeyError:
            raise ValueError(f"unknown extractor {name!r}; valid: {sorted(EXTRACTORS)}") from None
        value = fn(response)
        if value is not None:
            return value
    return None


def brace_depth(text: str) -> int:
    """Maximum nesting depth of unescaped braces (linear scan)."""
    depth = best = 0
    for m in _BRACE_TOKEN.finditer(text):
        tok = m.group()
        if tok == "{":
            depth += 1
            if depth > best:
                best = depth
        elif tok == "}":
            depth = max(0, depth - 1)
    return best


def braces_balanced(text: str) -> bool:
    depth = 0
    for m in _BRACE_TOKEN.finditer(text):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0
