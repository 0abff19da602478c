"""bijective_teacher_long.py OUT STEPS: the teacher's recipe with phase B run for STEPS steps (600 in the
recipe), same model seed and data; saves OUT/teacher and prints its greedy / T = 1 accuracy on the four
benchmarks. Run from a checkout with bijective.patch applied."""
import sys
from pathlib import Path

import torch

from opdkit.tasks import prepare as P
from opdkit.tasks.chain import chain_tokenizer

torch.set_num_threads(1)
out, steps = Path(sys.argv[1]), int(sys.argv[2])
tok = chain_tokenizer()
phases = (P.TEACHER_PHASES[0], P.TEACHER_PHASES[1]._replace(steps=steps))
model, _logs = P.train_curriculum(P.TEACHER_SPEC, tok, 0, phases, progress=False, desc="teacher")
P._save(model, tok, out / "teacher")
print(P.accuracy_table(model, tok, P.benchmarks(), n_sampled=1, seed=0), flush=True)
