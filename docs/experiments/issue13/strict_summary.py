"""strict_summary.py RUN_DIR_OR_PARENT...: per run (RUN_DIR/eval/samples.jsonl), strict pass@1 / pass@8 per chain
benchmark and their mean (a sample counts only when it writes the reference trace), the answer-graded mean
pass@8, and the % of samples with the right answer from a wrong trace."""
import json
import statistics
import sys
from pathlib import Path

from opdkit.demo.traces import strict_pass_at_k, trace_stats

args = [Path(a) for a in sys.argv[1:]]
runs = [r for a in args for r in ([a] if (a / "eval").is_dir() else sorted(x for x in a.iterdir() if x.is_dir()))]
for d in runs:
    p = d / "eval" / "samples.jsonl"
    if not (d / "eval" / "results.json").is_file():
        continue
    s = trace_stats(p)
    names = sorted(s["problems"], key=lambda b: int(b[5:].split("@")[0]))
    p1 = [100 * statistics.fmean(strict_pass_at_k(s["problems"][b], 1)) for b in names]
    p8 = [100 * statistics.fmean(strict_pass_at_k(s["problems"][b], 8)) for b in names]
    res = json.loads((d / "eval" / "results.json").read_text())["benchmarks"]
    graded = statistics.fmean(100 * res[b]["pass@8"] for b in names)
    print(f"{d.name:20s} strict pass@1 " + " ".join(f"{x:5.1f}" for x in p1) + f" | {statistics.fmean(p1):5.1f}"
          f"   strict pass@8 " + " ".join(f"{x:5.1f}" for x in p8) + f" | {statistics.fmean(p8):5.1f}"
          f"   graded pass@8 {graded:5.1f}   lucky {100 * s['chance']:.1f} %")
