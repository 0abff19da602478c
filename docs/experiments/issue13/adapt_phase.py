"""Adapt a shipped (unmarked-task) checkpoint to the marked task: one new token row, then SFT."""
import json, sys, time, torch
from pathlib import Path
from opdkit.tasks import prepare as P
from opdkit.tasks.chain import chain_tokenizer, make_benchmark
from opdkit.runtime.models import load_model
torch.set_num_threads(1)
src, out, steps, lr, sched, slips, every = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], float(sys.argv[6]), int(sys.argv[7])
out.mkdir(parents=True, exist_ok=True)
tok = chain_tokenizer()
model = load_model(src, dtype="float32", device="cpu")
with torch.no_grad():
    emb = model.get_input_embeddings().weight
    old = emb.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    for e in {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight,
              id(model.get_output_embeddings().weight): model.get_output_embeddings().weight}.values():
        e[old:] = e[3:old].mean(0)  # the new char starts as the mean character
print("tied", model.config.tie_word_embeddings, old, len(tok), flush=True)
dev = {k: make_benchmark(k, 64, seed=7) for k in (8, 12, 16, 24)}
def probe(m):
    step = len(list(out.glob("ck*"))) * every + every
    P._save(m, tok, out / f"ck{step}")
    r = {f"chain{k}": (round(P.evaluate_accuracy(m, tok, rows, 0.0, 1, 0), 3), round(P.evaluate_accuracy(m, tok, rows, 1.0, 2, 0), 3)) for k, rows in dev.items()}
    print(step, json.dumps(r), time.strftime("%H:%M:%S"), flush=True)
    return {}
P.sft(model, tok, steps=steps, lr=lr, seed=11, schedule=sched, warmup=20, k_range=(4, 24), progress=False,
      eval_every=every, eval_fn=probe, slips=(slips, slips))
