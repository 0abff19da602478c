"""A model's probability of stopping (writing ``answer`` at a line start) around the miniature's last step.

Teacher-forced, no sampling: for each problem of ``chainK@SEED`` (a dev data seed, not the held-out
benchmarks' seed 0) the model reads the prompt, the reference trace and then one or two made-up extra
steps (a letter of the prompt's, a random operation, computed correctly from the last state), and the script
reports ``p(stop)`` = the probability of the token ``a`` (only ``answer`` starts with a letter) at the
line start after ``k-2``, ``k-1`` and ``k`` reference steps and after ``k+1`` and ``k+2`` steps (the
made-up ones). A good teacher for on-policy distillation says "go on" before step k, "stop" at step k,
and still "stop" after an extra step the student made up (README, "The CPU miniature").

    python benchmarks/stop_probe.py                                          # shipped teacher and student
    python benchmarks/stop_probe.py --models DIR/teacher,DIR/student --ordered   # the prompt's ops in sequence
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from opdkit.tasks.chain import (
    LETTERS,
    apply_op,
    format_prompt,
    make_benchmark,
    random_op,
    random_problem,
    solve,
)

#: line starts probed, as steps written before them minus k
OFFSETS = (-2, -1, 0, 1, 2)


def probe_text(problem: str, rng: random.Random, extra: int = 2) -> tuple[str, int]:
    """``(prompt + reference lines + extra made-up lines, k)``; the made-up lines carry letters of the
    prompt's (in the countdown format no letter follows the last step's ``a``)."""
    sol = solve(problem).split("\n")[:-1]
    k = len(sol)
    x = int(sol[-1][-2:])
    lines = list(sol)
    for _ in range(extra):
        op, d = random_op(rng)
        y = apply_op(x, op, d)
        lines.append(f"{x:02d} {LETTERS[rng.randrange(k)]}{op}{d}={y:02d}")
        x = y
    return format_prompt(problem) + "\n".join(lines) + "\n", k


@torch.no_grad()
def stop_probs(model, tok, problems: list[str], seed: int = 0) -> dict[int, list[float]]:
    """``{offset: [p(stop) per problem]}`` for :data:`OFFSETS` (offset = steps written - k).

    ``p(stop)_i = softmax(logits_i)[id("a")]`` at the position whose next token starts line ``k + offset``
    (0-based count of step lines already written); one forward pass per problem reads every offset,
    since a causal model's logits at a position see only the tokens before it."""
    rng = random.Random(f"opdkit-stop-probe-{seed}")
    a_id = tok.convert_tokens_to_ids("a")
    nl_id = tok.convert_tokens_to_ids("\n")
    out: dict[int, list[float]] = {o: [] for o in OFFSETS}
    for problem in problems:
        text, k = probe_text(problem, rng, extra=max(OFFSETS))
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        probs_T = model(input_ids=ids).logits[0].float().softmax(-1)[:, a_id]
        newlines = (ids[0] == nl_id).nonzero().flatten().tolist()  # [0] ends the prompt; [j] ends step j
        for o in OFFSETS:
            j = k + o  # step lines written before this line start
            if 0 <= j < len(newlines):
                out[o].append(float(probs_T[newlines[j]]))
    return out


def _problems(k: int, n: int, seed: int, ordered: bool) -> list[str]:
    """``n`` distinct problems of ``chainK@seed``; ``ordered``: the same stream with the operations in sequence."""
    if not ordered:
        return [r["problem"] for r in make_benchmark(k, n, seed=seed)]
    rng = random.Random(f"opdkit-chain-bench-{k}-{seed}")  # make_benchmark's stream and draws
    out: list[str] = []
    while len(out) < n:
        problem = random_problem(rng, rng.randint(k, k), shuffle=False)
        if problem not in out:
            out.append(problem)
    return out


def main() -> None:
    from opdkit.demo.runner import shipped_models
    from opdkit.runtime.models import load_model, load_tokenizer

    student, teacher = shipped_models()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=f"{teacher},{student}", help="comma-separated model directories")
    ap.add_argument("--ks", default="8,12,16,24", help="chain lengths probed")
    ap.add_argument("--problems", type=int, default=64, help="problems per chain length")
    ap.add_argument("--seed", type=int, default=1, help="data seed of the problems (held-out benchmarks: 0)")
    ap.add_argument("--ordered", action="store_true", help="list the prompt's operations in tag order (the "
                    "variant measured for #13; the shipped task shuffles them)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ks = [int(k) for k in a.ks.split(",")]
    order = " (ops in order)" if a.ordered else ""
    print(f"p(stop) at line starts, mean (min-max over problems); chainK@{a.seed}{order}, {a.problems} problems per K")
    print("| model | K | " + " | ".join(f"after k{o:+d}" if o else "after k" for o in OFFSETS) + " |")
    print("|:--|--:|" + "--:|" * len(OFFSETS))
    for path in a.models.split(","):
        model = load_model(path, dtype="float32", device="cpu").eval()
        tok = load_tokenizer(path)
        for k in ks:
            problems = _problems(k, a.problems, a.seed, a.ordered)
            res = stop_probs(model, tok, problems, seed=a.seed)
            cells = [f"{statistics.fmean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in (res[o] for o in OFFSETS)]
            print(f"| {path} | {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
