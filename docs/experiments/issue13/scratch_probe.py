"""Dev-seed probe (chainK@7, never a held-out benchmark): T=1 pass@1, correct leading step fraction, stop kinds."""
import sys, collections, torch
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.prepare import generate
from opdkit.tasks.chain import make_benchmark, trace_errors, grade_chain
torch.set_num_threads(1)
for path in sys.argv[1:]:
    m = load_model(path, device="cpu"); tok = load_tokenizer(path)
    res = []
    for k in (8, 12, 16, 24):
        rows = make_benchmark(k, 32, seed=7)
        rr = [r for r in rows for _ in range(4)]
        outs = generate(m, tok, [r["problem"] for r in rr], temperature=1.0, seed=1)
        errs = [trace_errors(r["problem"], o) for r, o in zip(rr, outs)]
        p1 = sum(grade_chain(o, r["answer"]) for r, o in zip(rr, outs)) / len(rr)
        c = collections.Counter(e["kind"] for e in errs)
        pref = sum(e["correct_prefix"] / k for e in errs) / len(errs)
        res.append(f"k{k}: p1 {p1:.2f} pref {pref:.2f} exact {c['exact']/len(errs):.2f}")
    print(path, " | ".join(res), flush=True)
