"""``opdkit report RUN_DIR [RUN_DIR ...] [--metric pass@8] [--out DIR] [--group-seeds]``."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="compare runs: Markdown/CSV tables and PNG plots",
                       description="Paper-style comparison of eval results (results.json from `opdkit eval`) "
                                   "and training logs (metrics.jsonl). Writes report.md, report.csv, "
                                   "bars.png, passk.png and training.png to --out; prints the table.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="eval dir (results.json) or training run dir "
                        "(eval/results.json and/or metrics.jsonl)")
    p.add_argument("--metric", default="pass@8",
                   help="table metric: pass@K for any K <= n (recomputed from per-problem counts) or avg@n "
                        "(default: pass@8)")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    p.add_argument("--group-seeds", action="store_true",
                   help="merge runs whose labels differ only in -seedN/_seedN into one row: mean ± std")
    p.add_argument("--ks", default="", help="comma-separated k for the pass@k curves (default: 1..n)")


def run(args) -> int:
    from opdkit.eval.report import (
        ReportError,
        comparison_table,
        dedupe_labels,
        load_run,
        metric_title,
        normalize_metric,
        to_markdown,
        write_report,
    )

    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()}) or None
        if ks and ks[0] < 1:
            raise ValueError
    except ValueError:
        print(f"opdkit report: --ks must be comma-separated integers >= 1, got {args.ks!r}", file=sys.stderr)
        return 2
    try:
        runs = dedupe_labels([load_run(p) for p in args.runs])
        metric = normalize_metric(args.metric)
        evald = [r for r in runs if r.results is not None]
        if evald:
            header, rows = comparison_table(evald, metric, group_seeds=args.group_seeds)
            print(f"{metric_title(metric, evald)} (%)\n")
            print(to_markdown(header, rows))
            k = int(metric.split("@")[1]) if metric.startswith("pass@") else 0
            short = [f"{r.label} (n={r.n})" for r in evald if r.n and r.n < k]
            if short:
                print(f"\nnote: {metric} needs n >= {k} samples per problem; shown as — for: "
                      + ", ".join(short), file=sys.stderr)
        else:
            print("no eval results among the runs; training curves only")
        paths = write_report(runs, args.out, metric=metric, ks=ks, group_seeds=args.group_seeds)
    except ReportError as e:
        print(f"opdkit report: {e}", file=sys.stderr)
        return 2
    print()
    for p in paths.values():
        print(f"wrote {p}")
    return 0
