"""p(first tag): how surely a model copies the first step's tag (README, "The checkpoints").

The first solution line of a k-step chain is ``SS Xop d=..`` where ``X`` is the tag of the first operation the
prompt lists, ``LETTERS[k - 1]`` (``l`` for k = 12). Teacher-forced, no sampling: the model reads the prompt and
the first line's start value and space (``SS ``), and the script reports the mean probability it gives ``X``
next, over 64 dev problems (chainK@7, never a held-out benchmark) for k = 8 / 12 / 16 / 24, and how often ``X`` is
its most likely token.

    PYTHONPATH=src python docs/experiments/issue13/first_tag_probe.py MODEL_DIR [MODEL_DIR ...]
"""

import sys

import torch

from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.chain import LETTERS, format_prompt, make_benchmark, solve

torch.set_num_threads(1)


@torch.no_grad()
def first_tag(model, tok, k: int, n: int = 64) -> tuple[float, float]:
    probs, top = [], []
    want = tok.convert_tokens_to_ids(LETTERS[k - 1])
    for r in make_benchmark(k, n, seed=7):
        text = format_prompt(r["problem"]) + solve(r["problem"])[:3]  # "SS " of the first line
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        p_V = model(input_ids=ids).logits[0, -1].float().softmax(-1)
        probs.append(float(p_V[want]))
        top.append(int(p_V.argmax()) == want)
    return sum(probs) / n, sum(top) / n


for path in sys.argv[1:]:
    model, tok = load_model(path, dtype="float32", device="cpu").eval(), load_tokenizer(path)
    cells = [f"k={k} {p:.2f} (top-1 {t:.2f})" for k in (8, 12, 16, 24) for p, t in [first_tag(model, tok, k)]]
    print(f"{path}: p(first tag) " + " | ".join(cells), flush=True)
