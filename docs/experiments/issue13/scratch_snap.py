"""Train a student curriculum (teacher's phases, no slips) and save snapshots during phase B."""
import sys, json, torch
from pathlib import Path
from opdkit.runtime.models import TinyQwen3Spec
from opdkit.tasks import prepare as P
from opdkit.tasks.chain import chain_tokenizer
torch.set_num_threads(1)
hidden, layers, heads, hd, inter, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
spec = TinyQwen3Spec(vocab_size=P.VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=2,
                     head_dim=hd, intermediate_size=inter, max_position_embeddings=1024)
tok = chain_tokenizer()
model = P._build(spec, tok, 1)
print("params", sum(p.numel() for p in model.parameters()), flush=True)
phA, phB = P.Phase(800, 1e-3, 0, "constant", 50, (2, 8)), P.Phase(600, 1e-3, 5, "cosine", 20, (4, 24))
P.sft(model, tok, steps=phA.steps, lr=phA.lr, seed=phA.seed, schedule=phA.schedule, warmup=phA.warmup,
      k_range=phA.k_range, desc="A", progress=False)
P._save(model, tok, out / "b0")
def snap(m, _state={"n": 0}):
    _state["n"] += 50
    P._save(m, tok, out / f"b{_state['n']}")
    return {}
P.sft(model, tok, steps=phB.steps, lr=phB.lr, seed=phB.seed, schedule=phB.schedule, warmup=phB.warmup,
      k_range=phB.k_range, desc="B", progress=False, eval_every=50, eval_fn=snap)
print("done", flush=True)
