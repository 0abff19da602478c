"""The bijective teacher with a longer phase B (1000 steps instead of 600), same model seed and data."""
import sys, torch
from pathlib import Path
from opdkit.tasks import prepare as P
from opdkit.tasks.chain import chain_tokenizer
torch.set_num_threads(1)
out = Path(sys.argv[1]); steps = int(sys.argv[2])
tok = chain_tokenizer()
phases = (P.TEACHER_PHASES[0], P.TEACHER_PHASES[1]._replace(steps=steps))
model, logs = P.train_curriculum(P.TEACHER_SPEC, tok, 0, phases, progress=False, desc="teacher")
P._save(model, tok, out / "teacher")
benches = P.benchmarks(256) if hasattr(P, "benchmarks") else None
print(P.accuracy_table(model, tok, P.benchmarks(), n_sampled=1, seed=0), flush=True)
