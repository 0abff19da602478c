"""Continue SFT of a marked-task checkpoint; every N steps: save, and T=1 trace stats on a dev seed."""
import json, sys, time, torch, collections
from pathlib import Path
from opdkit.tasks import prepare as P
from opdkit.tasks.chain import chain_tokenizer, make_benchmark, trace_errors, grade_chain
from opdkit.runtime.models import load_model
torch.set_num_threads(1)
src, out, steps, lr, sched, every, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
out.mkdir(parents=True, exist_ok=True)
tok = chain_tokenizer()
model = load_model(src, dtype="float32", device="cpu")
dev = {k: make_benchmark(k, 32, seed=7) for k in (8, 16)}
def probe(m):
    step = len(list(out.glob("ck*"))) * every + every
    P._save(m, tok, out / f"ck{step}")
    res = {}
    for k, rows in dev.items():
        outs = P.generate(m, tok, [r['problem'] for r in rows for _ in range(4)], temperature=1.0)
        es = [trace_errors(rows[i // 4]['problem'], o) for i, o in enumerate(outs)]
        kinds = collections.Counter(e['kind'] for e in es)
        res[k] = {"exact": kinds['exact'] / len(es), "prefix": round(sum(e['correct_prefix'] for e in es) / len(es) / k, 3),
                  "acc": sum(grade_chain(o, rows[i // 4]['answer']) for i, o in enumerate(outs)) / len(outs)}
    print(step, json.dumps(res), time.strftime("%H:%M:%S"), flush=True)
    return {}
P.sft(model, tok, steps=steps, lr=lr, seed=seed, schedule=sched, warmup=20, k_range=(4, 24), progress=False,
      eval_every=every, eval_fn=probe)
