"""first_errors.py SAMPLES.jsonl...: where the sampled solutions of unsolved chain problems first go wrong,
and whether a problem's samples share that error (a systematic error: the student writes the same wrong
line with high probability) or scatter (sampling noise). Reads ``opdkit eval``'s samples.jsonl of
``chainK@S`` benchmarks; run with the checkout's task module (the countdown patch for countdown runs).
Per unsolved problem (0 of n samples correct): the share of samples whose first wrong line is the most
common one (same step, same text)."""
import collections
import json
import re
import sys

from opdkit.tasks.chain import make_benchmark, solve

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path)]
    by = collections.defaultdict(list)
    for r in rows:
        by[r["benchmark"]].append(r)
    out = []
    for bench, rs in by.items():
        k, seed = map(int, re.fullmatch(r"chain(\d+)@(\d+)", bench).groups())
        problems = {f"{bench}-{i}": p["problem"] for i, p in enumerate(make_benchmark(k, n=1 + max(
            int(r["id"].rsplit("-", 1)[1]) for r in rs), seed=seed))}
        per = collections.defaultdict(list)
        for r in rs:
            per[r["id"]].append(r)
        shares, steps = [], []
        for pid, samples in per.items():
            if any(x["reward"] for x in samples):
                continue
            ref = solve(problems[pid]).split("\n")
            firsts = []
            for x in samples:
                lines = x["response"].split("\n")
                i = next((j for j, (a, b) in enumerate(zip(lines, ref)) if a != b), min(len(lines), len(ref)))
                firsts.append((i, lines[i] if i < len(lines) else ""))
            (step, _), c = collections.Counter(firsts).most_common(1)[0]
            shares.append(c / len(samples))
            steps.append(step)
        n_un = len(shares)
        out.append(f"{bench}: {n_un}/{len(per)} unsolved; share of samples with the most common first error: "
                   f"mean {sum(shares) / max(1, n_un):.2f}, >= 3/4 in {sum(s >= 0.75 for s in shares)} problems, "
                   f">= 1/2 in {sum(s >= 0.5 for s in shares)}")
    print(path, *out, sep="\n  ")
