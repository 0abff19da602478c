"""Benchmark problem sets: JSON Lines loaders, a registry of short names, data-dir resolution.

The benchmark files are not shipped with opdkit. The expected layout is a directory with the
files named in :data:`BENCHMARKS` (JSON Lines, one object per line, fields ``id``, ``problem``,
``answer``, ``source`` plus any extras). See :func:`resolve_data_dir` for where it is looked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "DATA_DIR_ENV",
    "DataError",
    "Problem",
    "load_benchmark",
    "load_hf_problems",
    "load_jsonl_problems",
    "resolve_data_dir",
]

#: Short benchmark name -> file name inside the data directory.
BENCHMARKS: dict[str, str] = {
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "math500": "math500.jsonl",
    "amc23": "amc23.jsonl",
    "dapo17k": "dapo_math_17k.jsonl",
}

#: Environment variable naming the data directory.
DATA_DIR_ENV = "OPDKIT_DATA_DIR"

# Root of a source checkout (src/opdkit/eval/benchmarks.py -> repo root). Module-level so tests
# can point it elsewhere.
_REPO_ROOT = Path(__file__).resolve().parents[3]


class DataError(ValueError):
    """A malformed data row. The message names the file (or dataset) and the line (or row)."""


@dataclass
class Problem:
    id: str
    problem: str
    answer: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


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
    out: list[tuple[Problem, str]] = []
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
            problem = _row_to_problem(
                row,
                where,
                problem_field=problem_field,
                answer_field=answer_field,
                id_field=id_field,
                default_id=f"{path.stem}-{lineno}",
            )
            out.append((problem, where))
    _check_unique(out)
    return [p for p, _ in out]


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
    out: list[tuple[Problem, str]] = []
    for idx, row in enumerate(ds):
        where = f"{label} row {idx}"
        problem = _row_to_problem(
            row,
            where,
            problem_field=problem_field,
            answer_field=answer_field,
            id_field=id_field,
            default_id=f"{short}-{idx}",
        )
        out.append((problem, where))
    _check_unique(out)
    return [p for p, _ in out]


# --------------------------------------------------------------------------- data directory


def _candidate_dirs() -> list[tuple[str, Path]]:
    return [
        ("../shared/data relative to the current directory", Path.cwd() / ".." / "shared" / "data"),
        ("../shared/data relative to the opdkit checkout", _REPO_ROOT.parent / "shared" / "data"),
    ]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the benchmark .jsonl files.

    Order: the explicit `data_dir`; the ``OPDKIT_DATA_DIR`` environment variable;
    ``../shared/data`` relative to the current working directory; ``../shared/data`` relative to
    the opdkit source checkout. An explicit argument or a set environment variable that does not
    name a directory is an error (no silent fall-through). Raises FileNotFoundError listing every
    place searched.
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"benchmark data directory {str(p)!r} (passed as data_dir) does not exist"
            )
        return p.resolve()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"benchmark data directory {str(p)!r} (from ${DATA_DIR_ENV}) does not exist"
            )
        return p.resolve()
    candidates = _candidate_dirs()
    for _, p in candidates:
        if p.is_dir():
            return p.resolve()
    searched = "\n".join(f"  - {p.resolve()} ({why})" for why, p in candidates)
    raise FileNotFoundError(
        "could not find the benchmark data directory. Searched:\n"
        f"  - data_dir argument (not given)\n  - ${DATA_DIR_ENV} (not set)\n{searched}\n"
        f"Put the benchmark files ({', '.join(BENCHMARKS.values())}) in one of these directories, "
        f"set {DATA_DIR_ENV}=/path/to/data, or pass data_dir=..."
    )


def load_benchmark(
    name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> list[Problem]:
    """Load a registered benchmark by short name (see :data:`BENCHMARKS`) or any .jsonl file by path."""
    key = str(name_or_path)
    if key.lower() in BENCHMARKS:
        directory = resolve_data_dir(data_dir)
        path = directory / BENCHMARKS[key.lower()]
        if not path.is_file():
            raise FileNotFoundError(
                f"benchmark {key!r} expects the file {BENCHMARKS[key.lower()]!r} in {directory}, "
                "but it is not there"
            )
        return load_jsonl_problems(path)
    path = Path(key).expanduser()
    if path.is_file():
        return load_jsonl_problems(path)
    if path.suffix == ".jsonl" or os.sep in key or (os.altsep and os.altsep in key):
        raise FileNotFoundError(f"no such benchmark file: {key!r}")
    from opdkit.tasks.chain import BENCHMARK_KS

    raise ValueError(
        f"unknown benchmark {key!r}; valid names: {', '.join(sorted(BENCHMARKS))}, the CPU miniature's "
        f"chain benchmarks ({', '.join(BENCHMARK_KS)}), or a path to a .jsonl file"
    )
