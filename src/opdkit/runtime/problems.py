"""Problems: the :class:`Problem` record and its loaders (JSON Lines files, Hugging Face datasets).

A row is one JSON object with a string problem field, an answer field (string or number) and, for files
that have one, a unique ``id``; other fields go to :attr:`Problem.extra`. Malformed rows raise
:class:`DataError` naming the file and line; nothing is skipped silently. Named benchmarks and the data
directory are in :mod:`opdkit.runtime.benchmarks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataError", "Problem", "load_hf_problems", "load_jsonl_problems", "problems_from_rows"]


class DataError(ValueError):
    """A malformed data row. The message names the file (or dataset) and the line (or row)."""


@dataclass
class Problem:
    id: str
    problem: str
    answer: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def solution(self) -> str | None:
        """The row's worked ``solution`` (MATH500 and the chain task have one), or None when it has none."""
        sol = self.extra.get("solution")
        return sol if isinstance(sol, str) and sol.strip() else None


def problems_from_rows(rows: Iterable[Mapping]) -> list[Problem]:
    """Problems from in-memory rows that already have ``id``, ``problem``, ``answer`` (generated tasks); other
    fields (e.g. ``solution``) go to :attr:`Problem.extra`."""
    core = {"id", "problem", "answer", "source"}
    return [Problem(id=str(r["id"]), problem=r["problem"], answer=str(r["answer"]),
                    source=str(r.get("source", "")), extra={k: v for k, v in r.items() if k not in core})
            for r in rows]


# --------------------------------------------------------------------------- row conversion


def _answer_str(value: Any, where: str, answer_field: str) -> str:
    if isinstance(value, bool):  # bool is an int subclass; True is not an answer
        raise DataError(f"{where}: field {answer_field!r} must be a string or number, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(f"{where}: field {answer_field!r} is not a finite number ({value!r})")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {answer_field!r} is empty")
        return value.strip()
    raise DataError(f"{where}: field {answer_field!r} must be a string or number, got {type(value).__name__}")


def _row_to_problem(
    row: Any,
    where: str,
    *,
    problem_field: str,
    answer_field: str,
    id_field: str | None,
    default_id: str,
) -> Problem:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in (problem_field, answer_field):
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    problem = row[problem_field]
    if not isinstance(problem, str):
        raise DataError(f"{where}: field {problem_field!r} must be a string, got {type(problem).__name__}")
    if not problem.strip():
        raise DataError(f"{where}: field {problem_field!r} is empty")
    answer = _answer_str(row[answer_field], where, answer_field)
    if id_field and id_field in row:  # optional: without it the id is "<file stem>-<line number>"
        raw_id = row[id_field]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
            raise DataError(
                f"{where}: field {id_field!r} must be a non-empty string or integer, got {raw_id!r}"
            )
        pid = str(raw_id)
    else:
        pid = default_id
    source = row.get("source", "")
    source = "" if source is None else str(source)
    used = {problem_field, answer_field, "source"} | ({id_field} if id_field else set())
    extra = {k: v for k, v in row.items() if k not in used}
    return Problem(id=pid, problem=problem, answer=answer, source=source, extra=extra)


def _check_unique(problems: Iterable[tuple[Problem, str]]) -> None:
    seen: dict[str, str] = {}
    for p, where in problems:
        if p.id in seen:
            raise DataError(f"{where}: duplicate id {p.id!r} (first seen at {seen[p.id]})")
        seen[p.id] = where


# --------------------------------------------------------------------------- loaders


def _to_problems(rows: list[tuple[Any, str, str]], **fields: Any) -> list[Problem]:
    """Problems from ``(row, where, default_id)`` triples; ids must be unique (errors name ``where``)."""
    out = [(_row_to_problem(row, where, default_id=default_id, **fields), where) for row, where, default_id in rows]
    _check_unique(out)
    return [p for p, _ in out]


def load_jsonl_problems(
    path: str | os.PathLike,
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = "id",
) -> list[Problem]:
    """Load a JSON Lines file of problems.

    Every non-blank line must be a JSON object with a string `problem_field` and an `answer_field`
    (string or number; numbers become strings, ``27.0`` -> ``"27"``); both are required. An
    `id_field` is optional: rows without one (or every row, with ``id_field=None``) get the id
    ``"<stem>-<line>"``; ids must be unique.
    Other fields go to :attr:`Problem.extra`. Any malformed row raises :class:`DataError` naming
    the file and line number; rows are never skipped silently (blank lines are allowed).
    """
    path = Path(path)
    out: list[tuple[Any, str, str]] = []  # (row, where, default id)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            out.append((row, where, f"{path.stem}-{lineno}"))
    return _to_problems(out, problem_field=problem_field, answer_field=answer_field, id_field=id_field)


def load_hf_problems(
    name: str,
    split: str = "test",
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    *,
    subset: str | None = None,
    **load_kwargs: Any,
) -> list[Problem]:
    """Load problems from a Hugging Face dataset via ``datasets.load_dataset(name, subset, split=...)``.

    Requires the optional ``datasets`` package. With ``id_field=None`` ids are ``"<name>-<row>"``.
    Malformed rows raise :class:`DataError` naming the dataset, split and row index.
    """
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError as e:
        raise ImportError(
            "load_hf_problems needs the Hugging Face 'datasets' package, which is not installed. "
            "Install it with `pip install datasets`, or download the data as JSON Lines and use "
            "load_jsonl_problems()."
        ) from e
    ds = datasets.load_dataset(name, subset, split=split, **load_kwargs)
    label = f"{name}[{split}]" if subset is None else f"{name}/{subset}[{split}]"
    short = name.rstrip("/").rsplit("/", 1)[-1]
    rows = [(row, f"{label} row {idx}", f"{short}-{idx}") for idx, row in enumerate(ds)]
    return _to_problems(rows, problem_field=problem_field, answer_field=answer_field, id_field=id_field)
