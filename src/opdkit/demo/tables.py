"""The demo's comparison table: ``mean ± SE`` per benchmark and for the mean over benchmarks.

The standard error says how far a cell could move by chance, so two rows can be told apart:

* a row of several seeds: the mean over seeds and its standard error over seeds,
  ``SE = std(ddof = 1) / sqrt(seeds)`` (each seed's value is one draw of the whole experiment);
* a row of one run: the standard error over problems of the per-problem unbiased pass@k,
  ``SE_b = std_P(pass@k_p, ddof = 1) / sqrt(P)``, and for the mean over ``B`` benchmarks
  ``sqrt(sum_b SE_b^2) / B`` (the benchmarks' problems are independent draws). It covers the sampling of
  problems and responses, not training noise: only seeds measure that.
"""

from __future__ import annotations

import math
import statistics

from opdkit.eval.passk import pass_at_k_array
from opdkit.eval.runs import RunRecord, group_by_seed, problem_counts
from opdkit.eval.tables import MISSING, all_benchmarks, benchmark_value


def _problem_se(bench: dict, metric: str) -> float | None:
    """SE over problems of ``metric`` (``pass@K`` or ``avg@n``) from the stored per-problem counts."""
    counts = problem_counts(bench)
    if counts is None or len(counts[0]) < 2:
        return None
    n_P, c_P = counts
    k = 1 if metric == "avg@n" else int(metric.split("@")[1])
    if min(n_P) < k:
        return None
    vals = pass_at_k_array(n_P, c_P, k).tolist()
    return statistics.stdev(vals) / math.sqrt(len(vals))


def mean_se(values: list[float]) -> tuple[float, float | None]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def fmt_cell(m: float | None, se: float | None) -> str:
    if m is None:
        return MISSING
    return f"{100 * m:.1f}" if se is None else f"{100 * m:.1f} ± {100 * se:.1f}"


def se_cells(members: list[RunRecord], benches: list[str], metric: str) -> dict[str, tuple[float, float | None]]:
    """``{benchmark or "mean": (mean, SE)}`` of one seed group (see the module docstring for the SE)."""
    out: dict[str, tuple[float, float | None]] = {}
    per_seed = [{b: benchmark_value(r.results["benchmarks"][b], metric) for b in benches
                 if b in r.results["benchmarks"]} for r in members]
    if len(members) > 1:
        for b in benches:
            vals = [v[b] for v in per_seed if v.get(b) is not None]
            if vals:
                out[b] = mean_se(vals)
        means = [statistics.fmean(v.values()) for v in per_seed if v and None not in v.values()]
        if means:
            out["mean"] = mean_se(means)
        return out
    run, vals = members[0], per_seed[0]
    ses = []
    for b, v in vals.items():
        if v is not None:
            se = _problem_se(run.results["benchmarks"][b], metric)
            out[b] = (v, se)
            ses.append(se)
    if vals and None not in vals.values():
        se_mean = None if None in ses else math.sqrt(sum(s * s for s in ses)) / len(ses)
        out["mean"] = (statistics.fmean(vals.values()), se_mean)
    return out


def se_table(runs: list[RunRecord], metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows = seed groups (``-seedN`` labels merged), columns = benchmarks + mean; cells ``"m.m ± s.s"`` (%)."""
    runs = [r for r in runs if r.results is not None]
    benches = all_benchmarks(runs)
    header = ["run", "seeds", *benches, "mean"]
    rows = []
    for key, members in group_by_seed(runs):
        cells = se_cells(members, benches, metric)
        rows.append([key, str(len(members)), *(fmt_cell(*cells.get(c, (None, None))) for c in [*benches, "mean"])])
    return header, rows


SE_NOTE = ("mean ± standard error: over seeds for rows of several seeds (std / sqrt(seeds)); for a row of one run, "
           "over problems (per-problem unbiased pass@k), which leaves training noise out.")
