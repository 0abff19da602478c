"""The demo's report: the eval records of every job, the comparison tables (mean ± SE), collapses, how
the evaluated traces end and what training did, written under ``OUT/report/``.

:func:`write_demo_report` is what ``opdkit demo`` calls once every job has finished; the CLI only prints
what it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opdkit.demo.presets import VARIANTS, Preset
from opdkit.demo.runner import collapse_summary
from opdkit.demo.tables import SE_NOTE, se_table
from opdkit.demo.traces import strict_table, traces_table, training_table
from opdkit.eval.report import load_run, to_markdown, write_report

TRACES_HEAD = ("# How the evaluated traces end\n\nPercent of all evaluated samples (every benchmark, every seed): "
               "stopped before step k, wrote exactly k steps, ran past step k; the mean fraction of leading "
               "steps equal to the reference; correct answers (avg@n); samples that write the reference trace; "
               "right answers from a wrong trace (the answer grader counts them; on the chain task, where every "
               "operation is a bijection modulo 100, they come by chance).\n\n")
STRICT_HEAD = ("strict {metric} (%): a problem counts as solved only when one of its samples writes the reference "
               "trace; the answer grader above also counts wrong traces that end on the right answer:\n\n")

TRAINING_HEAD = ("# Training summary\n\nPer run, the mean of the first -> last 5 rollout steps (metrics.jsonl): the "
                 "sampled-token reverse KL to the teacher (nats/token), the mean |drift| between the behaviour "
                 "and current student, the smallest drift gate, the training solve rate and the share of "
                 "responses cut at max_new_tokens; and the largest mean |drift| of any step. Every run of a seed "
                 "sees the same prompts in the same order, and the prompt mix (k = 4..24) moves these "
                 "numbers from step to step: compare rows at the same step, not first with last.\n\n")


@dataclass
class DemoReport:
    tables: str  # pass@1 and pass@n tables, markdown, with the SE note
    collapse: dict  # collapse_summary
    training_md: str
    traces_md: str
    paths: dict  # write_report's files


def job_order(variants: list[str], seeds: int) -> list[str]:
    """Job names in table order: the base student's evaluation seeds, every variant's seeds, the teacher."""
    return [f"base-seed{s}" for s in range(seeds)] + [f"{v}-seed{s}" for v in variants for s in range(seeds)] + [
        "teacher"]


def write_demo_report(runs: dict[str, Path], variants: list[str], seeds: int, preset: Preset,
                      out: Path) -> DemoReport:
    """Write ``out/report/`` from the finished jobs ``runs`` ({job name: run directory})."""
    order = job_order(variants, seeds)
    metric = f"pass@{preset.eval_n}"
    records = [load_run(runs[k] / "eval") for k in order]
    for k, r in zip(order, records):  # training curves live next to the eval dir
        m = runs[k] / "metrics.jsonl"
        r.metrics_path = m if m.is_file() else None
    rep = out / "report"
    paths = write_report(records, rep, metric=metric, group_seeds=True, title=f"opdkit demo ({preset.name})")
    collapse = collapse_summary(runs, metric)
    (rep / "collapse.json").write_text(json.dumps(collapse, indent=1))
    labels = {"base": "base student", "teacher": "teacher", **{v: VARIANTS[v][0] for v in variants}}
    jobs = {k: runs[k] for k in order}
    traces_md, traces = traces_table(jobs, labels)
    (rep / "traces.md").write_text(TRACES_HEAD + traces_md + "\n")
    strict_md, strict = strict_table(traces["per_run"], labels, preset.eval_n)
    for s in traces["per_run"].values():  # the per-problem counts are for strict_table, not the json
        s.pop("problems")
    (rep / "traces.json").write_text(json.dumps(traces | {"strict": strict}, indent=1))
    train_md, train_stats = training_table(jobs, labels)
    (rep / "training.md").write_text(TRAINING_HEAD + train_md + "\n")
    (rep / "training.json").write_text(json.dumps(train_stats, indent=1))
    tables = []
    for m in ("pass@1", metric):
        header, rows = se_table(records, m)
        tables.append(f"{m} (%), {preset.eval_n} samples per problem, {preset.eval_problems} problems per "
                      f"benchmark:\n\n" + to_markdown(header, rows))
    tables.append(STRICT_HEAD.format(metric=metric) + strict_md)
    text = "\n\n".join(tables) + f"\n\n{SE_NOTE}\n"
    (rep / "table.md").write_text(text)
    return DemoReport(tables=text, collapse=collapse, training_md=train_md, traces_md=traces_md, paths=paths)
