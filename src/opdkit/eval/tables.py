"""Tables for ``opdkit report``: metric values per run and benchmark, comparison tables, Markdown and CSV.

Cells are percentages with one decimal; ``pass@K`` for any ``K ≤ n`` is recomputed from the per-problem
``(n, c)`` counts with the unbiased estimator (``docs/methods.md`` §7), so it does not matter which
``ks`` the eval stored; ``avg@n`` is read. The mean column is the unweighted mean over the benchmarks a
run has (as ``results.json`` does). Seed groups show ``mean ± std`` over seeds (sample standard
deviation, ddof = 1).
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

from opdkit.eval.passk import avg_at_n, mean_pass_at_k
from opdkit.eval.runs import ReportError, RunRecord, finite_number, group_by_seed, group_label, problem_counts

MISSING = "—"
PASS_RE = re.compile(r"^pass@(\d+)$")


def normalize_metric(metric: str) -> str:
    """``"Pass@4"`` → ``"pass@4"``; ``"avg"``, ``"avg@n"`` → ``"avg@n"``; other names kept (stored keys)."""
    m = metric.strip()
    low = m.lower()
    if low in ("avg", "avg@n", "mean@n"):
        return "avg@n"
    if low.startswith("pass@"):
        mm = PASS_RE.match(low)
        if not mm or int(mm[1]) < 1:
            raise ReportError(f"metric {metric!r}: expected pass@K with an integer K >= 1, or avg@n")
        return f"pass@{int(mm[1])}"
    return m


def benchmark_value(bench: dict, metric: str) -> float | None:
    """One benchmark's metric as a fraction in [0, 1], or None when it cannot be had.

    ``pass@K``: recomputed from ``per_problem`` (None when some problem has fewer than K samples);
    stored value when there are no per-problem counts. ``avg@n``: stored, else from the counts.
    Any other name: the stored value.
    """
    metric = normalize_metric(metric)
    counts = problem_counts(bench)
    if metric == "avg@n":
        v = finite_number(bench.get("avg@n"))
        if v is None and counts:
            try:
                v = avg_at_n(*counts)
            except ValueError:
                v = None
        return v
    m = PASS_RE.match(metric)
    if m and counts:
        k = int(m[1])
        try:
            if min(float(n) for n in counts[0]) < k:
                return None
            return mean_pass_at_k(counts[0], counts[1], k)
        except (ValueError, TypeError):
            pass  # non-integer counts (e.g. partial rewards): fall back to the stored value
    return finite_number(bench.get(metric))


def run_values(run: RunRecord, metric: str) -> dict[str, float | None]:
    """``{benchmark: fraction or None, ..., "mean": ...}`` for one run (its own benchmarks only).

    The mean is the unweighted mean over the run's benchmarks; None if any of them lacks the metric.
    """
    out: dict[str, float | None] = {}
    for b in run.benchmarks:
        out[b] = benchmark_value(run.results["benchmarks"][b], metric)
    vals = list(out.values())
    out["mean"] = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None
    return out


def all_benchmarks(runs: list[RunRecord]) -> list[str]:
    """Benchmark names in the first run's order, others' new names appended."""
    names: list[str] = []
    for r in runs:
        names += [b for b in r.benchmarks if b not in names]
    return names


def check_metric(runs: list[RunRecord], metric: str) -> str:
    metric = normalize_metric(metric)
    if metric == "avg@n" or PASS_RE.match(metric):
        return metric
    stored = {k for r in runs for b in r.benchmarks for k in r.results["benchmarks"][b]
              if finite_number(r.results["benchmarks"][b][k]) is not None}
    if metric not in stored:
        hint = ", ".join(sorted(stored - {"problems", "samples"})) or "none"
        raise ReportError(f"unknown metric {metric!r}: use pass@K (K <= n) or avg@n; stored keys: {hint}")
    return metric


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof = 1; None with < 2 values) of the non-missing values, and their count."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)



def _pct(v: float | None) -> float | str:
    return MISSING if v is None else round(100.0 * v, 1)


def comparison_table(runs: list[RunRecord], metric: str = "pass@8",
                     group_seeds: bool = False) -> tuple[list[str], list[list]]:
    """Rows = runs (those with eval results), columns = benchmarks + mean.

    Header ``["run", *benchmarks, "mean"]``. Cells: percent as a float with one decimal, ``"—"`` when
    missing; with ``group_seeds`` a seed group's cells are strings ``"m.m ± s.s"`` (a group of one, or
    with one value, shows the plain value).
    """
    runs = [r for r in runs if r.results is not None]
    metric = check_metric(runs, metric)
    benches = all_benchmarks(runs)
    header = ["run", *benches, "mean"]
    cols = [*benches, "mean"]
    vals = {id(r): run_values(r, metric) for r in runs}
    rows: list[list] = []
    if not group_seeds:
        for r in runs:
            rows.append([r.label] + [_pct(vals[id(r)].get(c)) for c in cols])
        return header, rows
    for key, members in group_by_seed(runs):
        row: list = [group_label(key, members)]
        for c in cols:
            m, s, _ = mean_std([vals[id(r)].get(c) for r in members])
            if m is None:
                row.append(MISSING)
            elif s is None:
                row.append(round(100.0 * m, 1))
            else:
                row.append(f"{100.0 * m:.1f} ± {100.0 * s:.1f}")
        rows.append(row)
    return header, rows


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("|", "\\|")


def to_markdown(header: list[str], rows: list[list], align: str | None = None) -> str:
    """GitHub Markdown table, padded for the terminal. ``align``: one ``l``/``r`` per column
    (default: first column left, the rest right)."""
    cells = [[_cell(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(3, *(len(r[j]) for r in cells)) for j in range(len(header))]
    align = align or ("l" + "r" * (len(header) - 1))

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align, strict=True)) + " |"

    sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                         for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def to_csv(header: list[str], rows: list[list], path: str | Path) -> Path:
    """Write the table with the csv module (UTF-8; numbers as written in the table). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def metric_title(metric: str, runs: list[RunRecord]) -> str:
    if metric == "avg@n":
        ns = sorted({r.n for r in runs if r.n})
        return "avg@" + ("/".join(map(str, ns)) if ns else "n")
    return metric


def runs_table(runs: list[RunRecord]) -> str:
    header = ["run", "source", "model", "n", "T", "top-p", "max new tokens", "training log"]
    rows = []
    for r in runs:
        res = r.results or {}
        rows.append([r.label, str(r.path), res.get("model") or MISSING, r.n if r.n else MISSING,
                     res.get("temperature", MISSING), res.get("top_p", MISSING),
                     res.get("max_new_tokens", MISSING), "yes" if r.metrics_path else "no"])
    return to_markdown(header, [[str(v) for v in row] for row in rows], align="lllrrrrl")


__all__ = ["MISSING", "PASS_RE", "all_benchmarks", "benchmark_value", "check_metric", "comparison_table",
           "mean_std", "metric_title", "normalize_metric", "run_values", "runs_table", "to_csv", "to_markdown"]
