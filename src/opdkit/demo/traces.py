"""Where the miniature's answers go wrong: step counts and correct prefixes of evaluated traces.

Reads an ``opdkit eval`` run's ``samples.jsonl`` on the chain benchmarks and summarises, per run, the
fraction of responses that stop before the last step (``short``), write exactly ``k`` steps
(``exact``) or run past it (``long``), and the mean fraction of leading steps that are right
(:func:`opdkit.tasks.chain.trace_errors`). On this task a wrong step count ruins the answer however
good the arithmetic is, so this table explains moves of pass@k that the per-token losses do not show.

It also separates the right answers that come from the reference trace from those that come from a wrong
trace (by chance on the chain task, whose operations are bijections modulo 100; with a task whose operations
merge states, such as ``*2`` modulo 100, wrong traces often end on the right answer), and
:func:`strict_table` recomputes pass@k counting a problem as solved only when a sample writes its reference
trace: the measure of what the student can actually do.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from opdkit.demo.tables import fmt_cell, mean_se
from opdkit.eval.passk import pass_at_k_array
from opdkit.eval.runs import read_metrics, seed_group_key
from opdkit.runtime.benchmarks import chain_spec, load_benchmark
from opdkit.tasks.chain import trace_errors


def _problems(names) -> dict[str, str]:
    out = {}
    for name in names:
        if chain_spec(name) is not None:  # chainK and chainK@SEED
            out.update({p.id: p.problem for p in load_benchmark(name)})
    return out


def trace_stats(samples_path: str | Path) -> dict:
    """``{"n", "short", "exact", "long", "prefix_frac", "correct", "reference", "chance", "problems"}`` over
    every sample of a ``samples.jsonl`` (fractions in [0, 1]; ``prefix_frac`` = mean of correct leading steps
    / k; ``reference``: samples that write the reference trace; ``chance``: right answers from another trace;
    ``problems``: ``{benchmark: {problem id: [samples, reference traces]}}``). Samples of benchmarks that are
    not chain benchmarks are skipped."""
    rows = [json.loads(line) for line in Path(samples_path).read_text().splitlines() if line.strip()]
    problems = _problems({r["benchmark"] for r in rows})
    n = short = exact = long = correct = reference = chance = 0
    prefix = 0.0
    per_problem: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        problem = problems.get(r["id"])
        if problem is None:
            continue
        e = trace_errors(problem, r["response"])
        right = bool(r.get("reward"))
        n += 1
        short += e["kind"] == "short"
        exact += e["kind"] == "exact"
        long += e["kind"] == "long"
        prefix += e["correct_prefix"] / e["k"]
        correct += right
        reference += e["reference"]
        chance += right and not e["reference"]
        counts = per_problem.setdefault(r["benchmark"], {}).setdefault(r["id"], [0, 0])
        counts[0] += 1
        counts[1] += e["reference"]
    d = max(n, 1)
    return {"n": n, "short": short / d, "exact": exact / d, "long": long / d, "prefix_frac": prefix / d,
            "correct": correct / d, "reference": reference / d, "chance": chance / d, "problems": per_problem}


def traces_table(runs: dict[str, Path], labels: dict[str, str]) -> tuple[str, dict]:
    """Markdown table and the stats, from each ``run/eval/samples.jsonl``; runs named ``NAME-seedS`` are
    averaged into one row ``NAME`` (mean over seeds; ``labels`` maps row names to display labels)."""
    per_run = {key: trace_stats(run / "eval" / "samples.jsonl") for key, run in runs.items()
               if (run / "eval" / "samples.jsonl").is_file()}
    groups: dict[str, list[dict]] = {}
    for key, s in per_run.items():
        groups.setdefault(seed_group_key(key)[0], []).append(s)
    rows = {g: {f: sum(s[f] for s in ss) / len(ss) for f in ss[0] if f != "problems"} | {"runs": len(ss)}
            for g, ss in groups.items()}
    lines = ["| run | runs | stopped early | k steps | ran past k | correct leading steps | correct answers | "
             "reference trace | right answer, wrong trace |", "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for g, s in rows.items():
        lines.append(f"| {labels.get(g, g)} | {s['runs']} | {100 * s['short']:.1f} | {100 * s['exact']:.1f} | "
                     f"{100 * s['long']:.1f} | {100 * s['prefix_frac']:.1f} | {100 * s['correct']:.1f} | "
                     f"{100 * s['reference']:.1f} | {100 * s['chance']:.1f} |")
    return "\n".join(lines), {"per_run": per_run, "per_variant": rows}


def strict_pass_at_k(problems: dict[str, list[int]], k: int) -> list[float] | None:
    """Per-problem unbiased pass@k, a sample counting as correct only when it writes the reference trace
    (``problems``: ``{id: [samples, reference traces]}``); None if there are none or one has < k samples."""
    if not problems or min(n for n, _ in problems.values()) < k:
        return None
    n_P, c_P = zip(*problems.values())
    return pass_at_k_array(list(n_P), list(c_P), k).tolist()


def strict_table(per_run: dict[str, dict], labels: dict[str, str], k: int) -> tuple[str, dict]:
    """Markdown table of the strict pass@k (:func:`strict_pass_at_k`) per benchmark and its mean over
    benchmarks, from :func:`traces_table`'s ``per_run`` stats. Runs named ``NAME-seedS`` are one row, mean ±
    standard error over seeds; a one-run row's SE is over problems, as in :mod:`opdkit.demo.tables`."""
    benches = sorted({b for s in per_run.values() for b in s["problems"]}, key=_bench_order)
    groups: dict[str, list[dict]] = {}
    for key, s in per_run.items():
        vals = {b: strict_pass_at_k(s["problems"].get(b, {}), k) for b in benches}
        if benches and None not in vals.values():
            groups.setdefault(seed_group_key(key)[0], []).append(vals)
    cells: dict[str, dict] = {}
    for g, runs in groups.items():
        if len(runs) > 1:  # over seeds: each seed's mean over problems is one draw
            per_seed = [{b: statistics.fmean(v[b]) for b in benches} for v in runs]
            cells[g] = {b: mean_se([v[b] for v in per_seed]) for b in benches}
            cells[g]["mean"] = mean_se([statistics.fmean(v.values()) for v in per_seed])
        else:  # over problems
            cells[g] = {b: (statistics.fmean(v), _se(v)) for b, v in runs[0].items()}
            ses = [se for _, se in cells[g].values()]
            cells[g]["mean"] = (statistics.fmean(m for m, _ in cells[g].values()),
                                None if None in ses else math.sqrt(sum(x * x for x in ses)) / len(ses))
    cols = [*benches, "mean"]
    lines = ["| run | seeds | " + " | ".join(cols) + " |", "|:--|--:|" + "--:|" * len(cols)]
    for g, c in cells.items():
        lines.append(f"| {labels.get(g, g)} | {len(groups[g])} | " + " | ".join(fmt_cell(*c[x]) for x in cols) + " |")
    return "\n".join(lines), cells


def _se(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _bench_order(name: str):
    spec = chain_spec(name)
    return (spec[0] if spec else 0, name)


TRAINING_FIELDS = ("sampled_rkl", "drift_abs_mean", "gate_min", "solve_rate", "stop_length")


def training_summary(metrics_path: str | Path, window: int = 5) -> dict:
    """First / last ``window`` rollout steps' means of the step metrics in :data:`TRAINING_FIELDS`, and the
    peak of the mean |drift| with its rollout step, from one run's ``metrics.jsonl``."""
    steps = [r for r in read_metrics(metrics_path) if r.get("kind") == "step"]
    out: dict = {"steps": len(steps)}
    if not steps:
        return out

    def mean(rows, f):
        vals = [r[f] for r in rows if isinstance(r.get(f), (int, float))]
        return sum(vals) / len(vals) if vals else None

    for f in TRAINING_FIELDS:
        out[f] = {"first": mean(steps[:window], f), "last": mean(steps[-window:], f)}
    peak = max(steps, key=lambda r: r.get("drift_abs_mean") or 0.0)
    out["drift_peak"] = {"value": peak.get("drift_abs_mean"), "step": peak.get("step")}
    return out


def training_table(runs: dict[str, Path], labels: dict[str, str], window: int = 5) -> tuple[str, dict]:
    """Markdown table (one row per training run: first → last ``window`` steps) and the raw summaries."""
    stats = {k: training_summary(r / "metrics.jsonl", window) for k, r in runs.items()
             if (r / "metrics.jsonl").is_file()}

    def fa(s, f, scale=1.0, fmt=".3f"):
        a, b = s[f]["first"], s[f]["last"]
        return "—" if a is None or b is None else f"{scale * a:{fmt}} → {scale * b:{fmt}}"

    lines = ["| run | sampled reverse KL | mean abs drift | gate min | solve rate (%) | hit max tokens (%) | "
             "drift peak (step) |", "|:--|--:|--:|--:|--:|--:|--:|"]
    for k, s in stats.items():
        if not s["steps"]:
            continue
        name, seed = seed_group_key(k)
        label = f"{labels.get(name, name)}-seed{seed}" if seed is not None else labels.get(k, k)
        pk = s["drift_peak"]
        lines.append(f"| {label} | {fa(s, 'sampled_rkl')} | {fa(s, 'drift_abs_mean', fmt='.4f')} | "
                     f"{fa(s, 'gate_min', fmt='.2f')} | {fa(s, 'solve_rate', 100, '.1f')} | "
                     f"{fa(s, 'stop_length', 100, '.1f')} | {pk['value']:.4f} ({pk['step']}) |")
    return "\n".join(lines), stats
