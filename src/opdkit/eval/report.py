"""Paper-style comparison of runs (``opdkit report``): ``report.md``, ``report.csv`` and the PNG plots.

Three layers, each its own module: :mod:`opdkit.eval.runs` loads run directories, :mod:`opdkit.eval.tables`
computes the values and tables, :mod:`opdkit.eval.plots` draws the figures; this module writes the report
from them (and re-exports their public names, the import location ``opdkit report`` and the demo use).
"""

from __future__ import annotations

from pathlib import Path

from opdkit.eval import plots
from opdkit.eval.runs import (
    ReportError,
    RunRecord,
    dedupe_labels,
    group_by_seed,
    load_run,
    seed_group_key,
)
from opdkit.eval.tables import (
    MISSING,
    PASS_RE,
    all_benchmarks,
    benchmark_value,
    check_metric,
    comparison_table,
    mean_std,
    metric_title,
    normalize_metric,
    run_values,
    runs_table,
    to_csv,
    to_markdown,
)


def write_report(runs: list[RunRecord], out_dir: str | Path, metric: str = "pass@8",
                 ks: list[int] | None = None, group_seeds: bool = False,
                 title: str = "opdkit report") -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``bars.png``, ``passk.png`` (runs with eval results) and
    ``training.png`` (runs with ``metrics.jsonl``) to ``out_dir``.

    ``ks``: the k of the pass@k curves (default 1..n). Returns ``{"md", "csv", "bars", "passk",
    "training"}`` → path, for the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evald = [r for r in runs if r.results is not None]
    metric = check_metric(evald, metric)
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
        if PASS_RE.match(metric):
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
    md += ["## Runs", "", runs_table(runs), ""]
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
