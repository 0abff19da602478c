"""answer_sources.py RUN_DIR...: where each run's right answers come from, per chain benchmark.

For every evaluated sample (RUN_DIR/eval/samples.jsonl): does it write the reference trace (every step line
and the answer line, `opdkit.tasks.chain.trace_errors`), and is its answer right (the eval's grader)? Prints,
per benchmark, the % of samples with the reference trace and the % with the right answer from another trace.
Runs named NAME-seedS are averaged over seeds. Works for chainK and chainK@SEED benchmarks.
"""
import collections
import json
import sys
from pathlib import Path

from opdkit.eval.runs import seed_group_key
from opdkit.runtime.benchmarks import load_benchmark
from opdkit.tasks.chain import trace_errors

groups = collections.defaultdict(list)
for d in map(Path, sys.argv[1:]):
    rows = [json.loads(line) for line in (d / "eval" / "samples.jsonl").read_text().splitlines() if line]
    problems = {p.id: p.problem for b in {r["benchmark"] for r in rows} for p in load_benchmark(b)}
    c = collections.Counter()
    for r in rows:
        ref = trace_errors(problems[r["id"]], r["response"])["reference"]
        c[(r["benchmark"], "n")] += 1
        c[(r["benchmark"], "reference")] += ref
        c[(r["benchmark"], "chance")] += bool(r["reward"]) and not ref
    groups[seed_group_key(d.name)[0]].append(c)
for name, cs in groups.items():
    benches = sorted({b for c in cs for b, _ in c}, key=lambda b: int(b[5:].split("@")[0]))
    cells = []
    for b in benches:
        ref = sum(100 * c[(b, "reference")] / c[(b, "n")] for c in cs) / len(cs)
        ch = sum(100 * c[(b, "chance")] / c[(b, "n")] for c in cs) / len(cs)
        cells.append(f"{b} {ref:5.1f} / {ch:4.1f}")
    print(f"{name:16s} runs {len(cs)}  (reference trace % / right answer from a wrong trace %)  " + " | ".join(cells))
