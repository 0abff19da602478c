"""Where the miniature's answers go wrong: step counts and correct prefixes of evaluated traces.

Reads an ``opdkit eval`` run's ``samples.jsonl`` on the chain benchmarks and summarises, per run, the
fraction of responses that stop before the last step (``short``), write exactly ``k`` steps
(``exact``) or run past it (``long``), and the mean fraction of leading steps that are right
(:func:`opdkit.tasks.chain.trace_errors`). On this task a wrong step count ruins the answer however
good the arithmetic is, so this table explains moves of pass@k that the per-token losses do not show.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    """``{"n", "short", "exact", "long", "prefix_frac", "correct"}`` over every sample of a ``samples.jsonl``
    (fractions in [0, 1]; ``prefix_frac`` = mean of correct leading steps / k). Samples of benchmarks that
    are not chain benchmarks are skipped."""
    rows = [json.loads(line) for line in Path(samples_path).read_text().splitlines() if line.strip()]
    problems = _problems({r["benchmark"] for r in rows})
    n = short = exact = long = correct = 0
    prefix = 0.0
    for r in rows:
        problem = problems.get(r["id"])
        if problem is None:
            continue
        e = trace_errors(problem, r["response"])
        n += 1
        short += e["kind"] == "short"
        exact += e["kind"] == "exact"
        long += e["kind"] == "long"
        prefix += e["correct_prefix"] / e["k"]
        correct += int(bool(r.get("reward")))
    d = max(n, 1)
    return {"n": n, "short": short / d, "exact": exact / d, "long": long / d, "prefix_frac": prefix / d,
            "correct": correct / d}


def traces_table(runs: dict[str, Path], labels: dict[str, str]) -> tuple[str, dict]:
    """Markdown table and the stats, from each ``run/eval/samples.jsonl``; runs named ``NAME-seedS`` are
    averaged into one row ``NAME`` (mean over seeds; ``labels`` maps row names to display labels)."""
    per_run = {key: trace_stats(run / "eval" / "samples.jsonl") for key, run in runs.items()
               if (run / "eval" / "samples.jsonl").is_file()}
    groups: dict[str, list[dict]] = {}
    for key, s in per_run.items():
        groups.setdefault(seed_group_key(key)[0], []).append(s)
    rows = {g: {f: sum(s[f] for s in ss) / len(ss) for f in ss[0]} | {"runs": len(ss)} for g, ss in groups.items()}
    lines = ["| run | runs | stopped early | k steps | ran past k | correct leading steps | correct answers |",
             "|:--|--:|--:|--:|--:|--:|--:|"]
    for g, s in rows.items():
        lines.append(f"| {labels.get(g, g)} | {s['runs']} | {100 * s['short']:.1f} | {100 * s['exact']:.1f} | "
                     f"{100 * s['long']:.1f} | {100 * s['prefix_frac']:.1f} | {100 * s['correct']:.1f} |")
    return "\n".join(lines), {"per_run": per_run, "per_variant": rows}


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
