"""Named problem sets: the math benchmark files, the miniature's ``chainK`` sets, the data directory.

One loader for every command: ``opdkit train`` (``data.train_file``), ``opdkit eval --benchmarks`` and
``opdkit diagnose --data`` all resolve names through :func:`load_benchmark`, so a name means the same
problems everywhere.

* Registered math files (:data:`BENCHMARKS`) are read from the data directory: the explicit
  ``data_dir`` argument (``--data-dir``, ``data.data_dir``), else ``$OPDKIT_DATA_DIR``. opdkit does not
  ship them and does not guess a location; the error when they are missing says how to get them.
* ``chainK`` for any ``K`` in ``1..26`` is the CPU miniature's task with ``K`` steps
  (:func:`opdkit.tasks.chain.make_benchmark`); ``chain8`` / ``12`` / ``16`` / ``24`` are its held-out sets.
  ``chainK@SEED`` is the same task from data seed ``SEED`` (the held-out sets use seed 0): problems the
  demo never evaluates.
* Anything else is a path to a JSON Lines file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opdkit.runtime.problems import Problem, load_jsonl_problems, problems_from_rows

__all__ = ["BENCHMARKS", "DATA_DIR_ENV", "GET_DATA", "chain_k", "chain_spec", "is_chain", "load_benchmark",
           "load_problem_sets", "resolve_data_dir"]

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

#: How to obtain the benchmark files (printed whenever they cannot be found).
GET_DATA = (
    "opdkit does not ship the math benchmark files. Put them in one directory as JSON Lines (one object "
    "per line with 'problem' and 'answer', 'id' optional), named " + ", ".join(BENCHMARKS.values()) + " (public "
    "sources: AIME 2024 and AMC 2023 from QwenLM/Qwen2.5-Math evaluation/data, AIME 2025 from "
    "eth-sri/matharena, MATH-500 from openai/prm800k, DAPO-Math-17k from BytedTsinghua-SIA/DAPO-Math-17k), "
    f"then pass --data-dir DIR (data.data_dir=DIR for training) or set {DATA_DIR_ENV}=DIR. The CPU "
    "miniature needs none of them: its chainK sets are generated."
)

_CHAIN_RE = re.compile(r"chain(\d+)(?:@(\d+))?")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the benchmark .jsonl files: the explicit ``data_dir``, else ``$OPDKIT_DATA_DIR``.

    A given directory that does not exist is an error (no fall-through); so is having neither. The
    message says how to get the files (:data:`GET_DATA`).
    """
    if data_dir:
        where, p = "passed as data_dir / --data-dir", Path(data_dir).expanduser()
    elif os.environ.get(DATA_DIR_ENV, "").strip():
        where, p = f"from ${DATA_DIR_ENV}", Path(os.environ[DATA_DIR_ENV].strip()).expanduser()
    else:
        raise FileNotFoundError(f"no benchmark data directory: data_dir / --data-dir not given and "
                                f"${DATA_DIR_ENV} not set. {GET_DATA}")
    if not p.is_dir():
        raise FileNotFoundError(f"benchmark data directory {str(p)!r} ({where}) does not exist. {GET_DATA}")
    return p.resolve()


def chain_spec(name: str) -> tuple[int, int] | None:
    """``"chain12"`` -> ``(12, 0)``, ``"chain12@3"`` -> ``(12, 3)``: ``(K, data seed)`` for any K in 1..26;
    None for other names. ``chainK`` with K out of range raises."""
    m = _CHAIN_RE.fullmatch(str(name).strip())
    if not m:
        return None
    from opdkit.tasks.chain import BENCHMARK_SEED, MAX_K

    k = int(m.group(1))
    if not 1 <= k <= MAX_K:
        raise ValueError(f"unknown chain benchmark {name!r}: K must be in 1..{MAX_K} (chainK or chainK@SEED)")
    return k, int(m.group(2)) if m.group(2) is not None else BENCHMARK_SEED


def chain_k(name: str) -> int | None:
    """``"chain12"`` or ``"chain12@3"`` -> 12 (any K in 1..26); None for other names."""
    spec = chain_spec(name)
    return None if spec is None else spec[0]


def load_benchmark(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """One problem set: ``chainK``, a registered name (see :data:`BENCHMARKS`) or a .jsonl path."""
    key = str(name_or_path)
    spec = chain_spec(key)
    if spec is not None:
        from opdkit.tasks.chain import make_benchmark

        return problems_from_rows(make_benchmark(spec[0], seed=spec[1], name=key.strip()))
    if key.lower() in BENCHMARKS:
        directory = resolve_data_dir(data_dir)
        path = directory / BENCHMARKS[key.lower()]
        if not path.is_file():
            raise FileNotFoundError(f"benchmark {key!r} expects the file {BENCHMARKS[key.lower()]!r} in {directory}, "
                                    f"but it is not there. {GET_DATA}")
        return load_jsonl_problems(path)
    path = Path(key).expanduser()
    if path.is_file():
        return load_jsonl_problems(path)
    if path.suffix == ".jsonl" or os.sep in key or (os.altsep and os.altsep in key):
        raise FileNotFoundError(f"no such benchmark file: {key!r}")
    from opdkit.tasks.chain import BENCHMARK_KS

    raise ValueError(f"unknown benchmark {key!r}; valid names: {', '.join(sorted(BENCHMARKS))}, the CPU miniature's "
                     f"chainK for K in 1..26, chainK@SEED for another data seed (held-out: {', '.join(BENCHMARK_KS)}),"
                     " or a path to a .jsonl file")


def load_problem_sets(spec: str, data_dir: str | os.PathLike | None = None, limit: int = 0) -> dict[str, list[Problem]]:
    """``"aime24,chain8,path.jsonl"`` -> ``{name: problems}`` (a path's name is its file stem); ``limit`` > 0
    keeps the first ``limit`` problems of each set."""
    out = {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        probs = load_benchmark(name, data_dir or None)
        out[Path(name).stem if name.endswith(".jsonl") else name] = probs[:limit] if limit else probs
    if not out:
        raise ValueError(f"no benchmark names in {spec!r}")
    return out


def is_chain(problems: list[Problem]) -> bool:
    """Whether these are the CPU miniature's chain problems (the first one parses as one)."""
    from opdkit.tasks.chain import parse_problem

    if not problems:
        return False
    try:
        parse_problem(problems[0].problem)
        return True
    except ValueError:
        return False
