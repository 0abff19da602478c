"""Loading runs for ``opdkit report``: eval and training run directories, labels, seed groups, metrics logs.

A run is an eval directory (``results.json`` from ``opdkit eval``) or a training run directory
(``eval/results.json`` and/or ``metrics.jsonl``). With seed grouping, runs whose labels differ only in a
``-seedN`` / ``_seedN`` token (e.g. ``opd_block-seed0``, ``opd_block-seed1``) form one group;
:func:`seed_group_key` is the one parser of that suffix (the demo uses it too).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

_SEED_RE = re.compile(r"[-_]seed[-_=]?(\d+)", re.IGNORECASE)


def finite_number(v: object) -> float | None:
    """``v`` as a float when it is a finite int or float (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def problem_counts(bench: dict) -> tuple[list, list] | None:
    """``(n_P, c_P)`` per-problem sample and correct counts of one benchmark entry, or None without them."""
    pp = bench.get("per_problem") if isinstance(bench, dict) else None
    if not isinstance(pp, list) or not pp:
        return None
    try:
        return [p["n"] for p in pp], [p["c"] for p in pp]
    except (KeyError, TypeError):
        return None


class ReportError(ValueError):
    """A run directory or metric that the report cannot use (message says why)."""


@dataclass
class RunRecord:
    """One run: display label, source dir, parsed ``results.json`` (or None), ``metrics.jsonl`` (or None)."""

    label: str
    path: Path
    results: dict | None = None
    metrics_path: Path | None = None

    @property
    def benchmarks(self) -> list[str]:
        return list((self.results or {}).get("benchmarks") or {})

    @property
    def n(self) -> int | None:
        """Samples per problem (the smallest per-problem n when the counts are stored)."""
        ns = [nc[0] for b in self.benchmarks if (nc := problem_counts(self.results["benchmarks"][b]))]
        if ns:
            return min(min(n_P) for n_P in ns)
        n = (self.results or {}).get("n")
        return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None



def _read_results(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read results ({e})") from e
    if not isinstance(res, dict) or not isinstance(res.get("benchmarks"), dict):
        raise ReportError(f"{path}: not an `opdkit eval` results file (no 'benchmarks' object)")
    return res


def load_run(path: str | Path) -> RunRecord:
    """Load a run directory: an eval dir (``results.json``) or a training run dir (``eval/results.json``
    and/or ``metrics.jsonl``). A path to ``results.json`` itself works too.

    Label: the results' ``label`` when set, else the directory name (for a dir named ``eval`` inside a
    training run, the run's name). An eval dir named ``eval`` also picks up ``../metrics.jsonl``.
    Raises :class:`ReportError` when the path has neither results nor metrics.
    """
    p = Path(path)
    if p.is_file() and p.name in ("results.json", "metrics.jsonl"):
        p = p.parent
    if not p.exists():
        raise ReportError(f"{path}: no such directory")
    if not p.is_dir():
        raise ReportError(f"{path}: not a directory (expected an eval dir or a training run dir)")
    name_dir = p.resolve()
    results_path = next((q for q in (p / "results.json", p / "eval" / "results.json") if q.is_file()), None)
    metrics_path = p / "metrics.jsonl" if (p / "metrics.jsonl").is_file() else None
    if metrics_path is None and name_dir.name == "eval" and (p / ".." / "metrics.jsonl").is_file():
        metrics_path = (name_dir.parent / "metrics.jsonl")
    if results_path is None and metrics_path is None:
        raise ReportError(f"{path}: not a run directory — expected results.json (an `opdkit eval` output "
                          "dir), or eval/results.json and/or metrics.jsonl (an `opdkit train` run dir)")
    results = _read_results(results_path) if results_path is not None else None
    label = str((results or {}).get("label") or "").strip()
    if not label:
        label = name_dir.parent.name if name_dir.name == "eval" else name_dir.name
    return RunRecord(label=label, path=p, results=results, metrics_path=metrics_path)


def dedupe_labels(runs: list[RunRecord]) -> list[RunRecord]:
    """Make labels unique in place (``x``, ``x (2)``, ...) so table rows and legends stay distinguishable."""
    seen: dict[str, int] = {}
    for r in runs:
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label} ({seen[r.label]})"
        else:
            seen[r.label] = 1
    return runs


def seed_group_key(label: str) -> tuple[str, int | None]:
    """``"opd_block-seed1"`` → ``("opd_block", 1)``; labels without a seed token → ``(label, None)``."""
    m = _SEED_RE.search(label)
    if not m:
        return label, None
    key = (label[:m.start()] + label[m.end():]).strip() or label
    return key, int(m[1])


def group_by_seed(runs: list[RunRecord]) -> list[tuple[str, list[RunRecord]]]:
    """Runs grouped by :func:`seed_group_key`, in first-appearance order."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        key, seed = seed_group_key(r.label)
        groups.setdefault(key if seed is not None else f"\0{r.label}", []).append(r)
    return [(k.lstrip("\0"), v) for k, v in groups.items()]


def group_label(key: str, members: list[RunRecord]) -> str:
    return members[0].label if len(members) == 1 else f"{key} ({len(members)} seeds)"


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl``, skipping unparsable lines (a run still being written)."""
    from opdkit.train.telemetry import read_metrics as read

    return read(Path(path), skip_bad=True)


__all__ = ["ReportError", "RunRecord", "dedupe_labels", "finite_number", "group_by_seed", "group_label",
           "load_run", "problem_counts", "read_metrics", "seed_group_key"]
