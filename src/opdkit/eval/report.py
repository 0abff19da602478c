"""Paper-style comparison of runs: Markdown/CSV tables and PNG plots (``opdkit report``).

A run is an eval directory (``results.json`` from ``opdkit eval``) or a training run directory
(``eval/results.json`` and/or ``metrics.jsonl``). Table cells are percentages with one decimal;
``pass@K`` for any ``K ≤ n`` is recomputed from the per-problem ``(n, c)`` counts with the
unbiased estimator (§7), so it does not matter which ``ks`` the eval stored; ``avg@n`` is read.
The mean column is the unweighted mean over the benchmarks a run has (as ``results.json`` does).

With seed grouping, runs whose labels differ only in a ``-seedN`` / ``_seedN`` token (e.g.
``opd_block-seed0``, ``opd_block-seed1``) form one row, shown as ``mean ± std`` over seeds
(sample standard deviation, ddof = 1).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from opdkit.eval.passk import avg_at_n, mean_pass_at_k

MISSING = "—"
_PASS_RE = re.compile(r"^pass@(\d+)$")
_SEED_RE = re.compile(r"[-_]seed[-_=]?(\d+)", re.IGNORECASE)


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
        ns = [nc[0] for b in self.benchmarks if (nc := _counts(self.results["benchmarks"][b]))]
        if ns:
            return min(min(n_P) for n_P in ns)
        n = (self.results or {}).get("n")
        return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


# ----------------------------------------------------------------------------------------------- loading


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


# ----------------------------------------------------------------------------------------------- metrics


def normalize_metric(metric: str) -> str:
    """``"Pass@4"`` → ``"pass@4"``; ``"avg"``, ``"avg@n"`` → ``"avg@n"``; other names kept (stored keys)."""
    m = metric.strip()
    low = m.lower()
    if low in ("avg", "avg@n", "mean@n"):
        return "avg@n"
    if low.startswith("pass@"):
        mm = _PASS_RE.match(low)
        if not mm or int(mm[1]) < 1:
            raise ReportError(f"metric {metric!r}: expected pass@K with an integer K >= 1, or avg@n")
        return f"pass@{int(mm[1])}"
    return m


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _counts(bench: dict) -> tuple[list, list] | None:
    pp = bench.get("per_problem") if isinstance(bench, dict) else None
    if not isinstance(pp, list) or not pp:
        return None
    try:
        return [p["n"] for p in pp], [p["c"] for p in pp]
    except (KeyError, TypeError):
        return None


def benchmark_value(bench: dict, metric: str) -> float | None:
    """One benchmark's metric as a fraction in [0, 1], or None when it cannot be had.

    ``pass@K``: recomputed from ``per_problem`` (None when some problem has fewer than K samples);
    stored value when there are no per-problem counts. ``avg@n``: stored, else from the counts.
    Any other name: the stored value.
    """
    metric = normalize_metric(metric)
    counts = _counts(bench)
    if metric == "avg@n":
        v = _num(bench.get("avg@n"))
        if v is None and counts:
            try:
                v = avg_at_n(*counts)
            except ValueError:
                v = None
        return v
    m = _PASS_RE.match(metric)
    if m and counts:
        k = int(m[1])
        try:
            if min(float(n) for n in counts[0]) < k:
                return None
            return mean_pass_at_k(counts[0], counts[1], k)
        except (ValueError, TypeError):
            pass  # non-integer counts (e.g. partial rewards): fall back to the stored value
    return _num(bench.get(metric))


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


def _check_metric(runs: list[RunRecord], metric: str) -> str:
    metric = normalize_metric(metric)
    if metric == "avg@n" or _PASS_RE.match(metric):
        return metric
    stored = {k for r in runs for b in r.benchmarks for k in r.results["benchmarks"][b]
              if _num(r.results["benchmarks"][b][k]) is not None}
    if metric not in stored:
        hint = ", ".join(sorted(stored - {"problems", "samples"})) or "none"
        raise ReportError(f"unknown metric {metric!r}: use pass@K (K <= n) or avg@n; stored keys: {hint}")
    return metric


# ----------------------------------------------------------------------------------------------- seeds


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


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof = 1; None with < 2 values) of the non-missing values, and their count."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


# ----------------------------------------------------------------------------------------------- tables


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
    metric = _check_metric(runs, metric)
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


# ----------------------------------------------------------------------------------------------- report


def metric_title(metric: str, runs: list[RunRecord]) -> str:
    if metric == "avg@n":
        ns = sorted({r.n for r in runs if r.n})
        return "avg@" + ("/".join(map(str, ns)) if ns else "n")
    return metric


def _runs_table(runs: list[RunRecord]) -> str:
    header = ["run", "source", "model", "n", "T", "top-p", "max new tokens", "training log"]
    rows = []
    for r in runs:
        res = r.results or {}
        rows.append([r.label, str(r.path), res.get("model") or MISSING, r.n if r.n else MISSING,
                     res.get("temperature", MISSING), res.get("top_p", MISSING),
                     res.get("max_new_tokens", MISSING), "yes" if r.metrics_path else "no"])
    return to_markdown(header, [[str(v) for v in row] for row in rows], align="lllrrrrl")


def write_report(runs: list[RunRecord], out_dir: str | Path, metric: str = "pass@8",
                 ks: list[int] | None = None, group_seeds: bool = False,
                 title: str = "opdkit report") -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``bars.png``, ``passk.png`` (runs with eval results) and
    ``training.png`` (runs with ``metrics.jsonl``) to ``out_dir``.

    ``ks``: the k of the pass@k curves (default 1..n). Returns ``{"md", "csv", "bars", "passk",
    "training"}`` → path, for the files written.
    """
    from opdkit.eval import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evald = [r for r in runs if r.results is not None]
    metric = _check_metric(evald, metric)
    header, rows = comparison_table(evald, metric, group_seeds=group_seeds)
    written: dict[str, Path] = {"csv": to_csv(header, rows, out / "report.csv")}

    if evald:
        written["bars"] = plots.bars_png(evald, metric, out / "bars.png", group_seeds=group_seeds,
                                         palette_runs=runs)
        p = plots.passk_png(evald, out / "passk.png", ks=ks, group_seeds=group_seeds, palette_runs=runs)
        if p is not None:
            written["passk"] = p
    if any(r.metrics_path for r in runs):
        p = plots.training_png(runs, out / "training.png", group_seeds=group_seeds, palette_runs=runs)
        if p is not None:
            written["training"] = p

    mt = metric_title(metric, evald)
    md = [f"# {title}", ""]
    if evald:
        md += [f"## {mt} (%)", "", to_markdown(header, rows), ""]
        notes = []
        benches = all_benchmarks(evald)
        short = [f"{r.label} ({', '.join(b for b in benches if b not in r.benchmarks)})"
                 for r in evald if len(r.benchmarks) < len(benches)]
        notes.append("mean = unweighted mean over the benchmarks a run has" +
                     (f"; runs missing benchmarks: {'; '.join(short)}" if short else "") + ".")
        if _PASS_RE.match(metric):
            notes.append(f"{metric} recomputed from per-problem counts with the unbiased estimator "
                         f"(Chen et al. 2021); {MISSING} = not evaluated or fewer than "
                         f"{metric.split('@')[1]} samples per problem.")
        if group_seeds:
            notes.append("seed groups: mean ± sample std (ddof = 1) over seeds.")
        md += [f"- {n}" for n in notes] + [""]
        nmax = max((r.n or 0) for r in evald)
        # pass@1 is avg@n (c/n per problem), so the extra tables are avg@n and pass@n
        extra = [m for m in dict.fromkeys(["avg@n", f"pass@{nmax}"] if nmax else ["avg@n"])
                 if m != metric and not (metric == "pass@1" and m == "avg@n")]
        for m in extra:
            h, rr = comparison_table(evald, m, group_seeds=group_seeds)
            md += [f"### {metric_title(m, evald)} (%)", "", to_markdown(h, rr), ""]
    else:
        md += ["No eval results among the runs (no results.json); training curves only.", ""]
    md += ["## Runs", "", _runs_table(runs), ""]
    figs = [("bars", f"{mt} per benchmark"), ("passk", "pass@k over k"),
            ("training", "training curves over rollout steps")]
    imgs = [(k, cap) for k, cap in figs if k in written]
    if imgs:
        md += ["## Plots", ""]
        for k, cap in imgs:
            md += [f"### {cap}", "", f"![{cap}]({written[k].name})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return {"md": md_path, **written}


__all__ = ["MISSING", "ReportError", "RunRecord", "load_run", "dedupe_labels", "normalize_metric",
           "benchmark_value", "run_values", "all_benchmarks", "seed_group_key", "group_by_seed", "mean_std",
           "comparison_table", "to_markdown", "to_csv", "metric_title", "write_report"]
