"""A synthetic, exactly verifiable, long-horizon task for the CPU miniature: modular op chains.

A problem is a start value and a chain of ``k`` operations on a state modulo 100. The operations are
tagged by letters that count down: step ``i`` (0-based) runs the operation tagged ``LETTERS[k-1-i]``, so
the last step is always ``a``. The prompt lists the first operation first and the others in a random
order, so the tag is the only way to find the next one::

    problem:   37 c+5 a-7 b*3
    solution:  37 c+5=42
               42 b*3=26
               26 a-7=19
               answer: 19

Each solution line has a fixed width of 10 characters (9 + newline): the previous state (2 digits,
zero padded), a space, the tagged operation exactly as written in the prompt (letter, op, operand
``d`` in 2..9 for ``+``/``-`` and 3, 7 or 9 for ``*``), ``=`` and the new state (2 digits).
The trace ends with ``answer: NN`` (no trailing newline; the model emits eos after it). For ``k``
steps the trace is ``10*k + 10`` characters, so ``k = 12`` gives 130 tokens (131 with eos). Steps are
separated by newlines, which is what the NewlineSpan gate segments on.

Why a countdown (#13, README "The CPU miniature"): both ends of the chain are local decisions (the
first operation is the prompt's first; stop after the ``a`` line), and every step in between is a
long-range lookup. In the first shipped format (``countdown=False``: step ``i`` runs ``LETTERS[i]``, all
operations shuffled; kept for comparison, not trained on any more) the only sign of the last step
was that no operation carried the next letter, an absence the small student does not learn to see;
per-token reverse KL then resolves the ambiguous stop towards "go on" (continuing is right on k-1 of k
line starts), and every OPD variant lowered the student by running past step k. A terminal mark on the
last operation (a ``.`` the trace copies) and the operations listed in order were measured too: both
leave the stop a lookup the student gets wrong often, and OPD again made it run past the end.
Warm-starting the first format's checkpoints on the countdown format left the student unable to
relearn its first step, so the shipped checkpoints are trained on the countdown format from scratch.

Long horizon: the model must copy the previous state (local), fetch operation ``i`` from the prompt
by its letter (a long-range lookup: the `` b*3`` of the trace repeats the prompt's) and compute it; one wrong step
almost always ruins the answer, so accuracy falls geometrically with ``k``.

Data streams (all from ``random.Random`` seeded with strings, so they are stable across runs and
Python versions):

* benchmarks ``chain8`` / ``chain12`` / ``chain16`` / ``chain24`` (playing MATH500 / AMC23 / AIME24 /
  AIME25): ``k`` fixed, ``BENCHMARK_SIZE`` rows each, stream ``"opdkit-chain-bench-{k}-{seed}"``;
  :func:`make_benchmark` builds ``chainK`` for any ``K`` and any data seed (``opdkit eval --benchmarks
  chain12@3``: seed 3, a stream disjoint in practice from the default seed's and from training, for checks
  on problems the demo never sees);
* training prompts: ``k`` uniform in ``TRAIN_K_RANGE`` = [4, 24] (inclusive), stream
  ``"opdkit-chain-train-{seed}"``; any problem text that occurs in a benchmark (default seed) is
  rejected, so training and held-out prompts are disjoint by construction.

Prompts are plain text: ``format_prompt(problem) = problem + "\\n"`` (no chat template); the shipped
miniature checkpoints are trained on exactly that format.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Iterable, Iterator
from pathlib import Path

MOD = 100
OPS = "+-*"
DIGITS = tuple(range(2, 10))  # operands of + and -
# multipliers coprime to MOD: every operation is a bijection of the state, so a wrong trace ends on a spread
# of answers and rarely on the right one by chance. With *2 / *4 / *5 / *6 / *8 (the first shipped task,
# before the bijective design of #13) most of the student's answer-graded pass@8 was such lucky answers.
MUL_DIGITS = (3, 7, 9)
LETTERS = string.ascii_lowercase  # one tag per step: k <= 26
MAX_K = len(LETTERS)
LINE_WIDTH = 10  # "37 a+5=42\n"
ANSWER_PREFIX = "answer: "

TRAIN_K_RANGE = (4, 24)
BENCHMARK_KS = {"chain8": 8, "chain12": 12, "chain16": 16, "chain24": 24}
BENCHMARK_ROLE = {"chain8": "MATH500", "chain12": "AMC23", "chain16": "AIME24", "chain24": "AIME25"}


def random_op(rng: random.Random) -> tuple[str, int]:
    """One random operation ``(op, d)``: ``op`` uniform over :data:`OPS`, ``d`` uniform over
    :data:`MUL_DIGITS` for ``*`` and over :data:`DIGITS` otherwise."""
    op = rng.choice(OPS)
    return op, rng.choice(MUL_DIGITS if op == "*" else DIGITS)


BENCHMARK_SIZE = 256
BENCHMARK_SEED = 0

# Exactly the characters a prompt or a trace can contain.
ALPHABET = string.digits + LETTERS + OPS + "=: \n"

_GROUP = r"[a-z][+\-*]\d"  # a tagged operation: letter, op, operand
_PROBLEM_RE = re.compile(r"^(\d{1,2})((?: " + _GROUP + r")+)$")
_OP_RE = re.compile(r" (" + _GROUP + r")")
_ANSWER_RE = re.compile(r"^\s*answer:\s*(-?\d+)\s*$", re.MULTILINE)


def apply_op(x: int, op: str, d: int) -> int:
    """One step of the chain: ``(x op d) mod 100``."""
    if op == "+":
        return (x + d) % MOD
    if op == "-":
        return (x - d) % MOD
    if op == "*":
        return (x * d) % MOD
    raise ValueError(f"unknown op {op!r}")


def tag(i: int, k: int, countdown: bool = True) -> str:
    """The letter of step ``i`` (0-based) of ``k``: ``LETTERS[k-1-i]`` (countdown), else ``LETTERS[i]``."""
    return LETTERS[k - 1 - i] if countdown else LETTERS[i]


def format_problem(start: int, ops: list[tuple[str, int]], order: list[int] | None = None,
                   countdown: bool = True) -> str:
    """``start``, ``[(op, d), ...]`` in execution order, and the order in which the steps' tagged ops
    are listed (default: in sequence; with ``countdown`` step 0 must come first) -> ``"37 c+5 a-7 b*3"``."""
    if not 1 <= len(ops) <= MAX_K:
        raise ValueError(f"need 1..{MAX_K} ops, got {len(ops)}")
    order = list(range(len(ops))) if order is None else list(order)
    if sorted(order) != list(range(len(ops))):
        raise ValueError(f"order must be a permutation of 0..{len(ops) - 1}")
    if countdown and order[0] != 0:
        raise ValueError("a countdown problem lists its first step first")
    k = len(ops)
    return f"{start:02d}" + "".join(f" {tag(i, k, countdown)}{ops[i][0]}{ops[i][1]}" for i in order)


def random_problem(rng: random.Random, k: int, shuffle: bool = True, countdown: bool = True) -> str:
    """A random problem text with ``k`` ops: the first listed first, the others in a random order when
    ``shuffle`` (the shipped task), else in sequence. ``countdown=False``: the first format (all ops
    shuffled, tags counting up). The random draws do not depend on ``countdown``."""
    start = rng.randrange(MOD)
    ops = [random_op(rng) for _ in range(k)]
    order = rng.sample(range(k), k) if shuffle else None
    if countdown and order is not None:
        order = [0] + [i for i in order if i != 0]
    return format_problem(start, ops, order, countdown)


def parse_problem(problem: str, countdown: bool = True) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of :func:`format_problem`: ``(start, ops in execution order)``; ``ValueError`` if malformed
    (tags that are not exactly ``a``, ``b``, ... once each; with ``countdown``, a first listed op that is
    not the highest letter)."""
    text = problem.strip()
    m = _PROBLEM_RE.match(text)
    if not m:
        raise ValueError(f"not a chain problem: {problem!r}")
    found = {}
    groups = _OP_RE.findall(m.group(2))
    for g in groups:
        letter, op, d = g[0], g[1], g[2]
        if letter in found:
            raise ValueError(f"tag {letter!r} used twice in {problem!r}")
        found[letter] = (op, int(d))
    if sorted(found) != list(LETTERS[:len(found)]):
        raise ValueError(f"tags must be a..{LETTERS[len(found) - 1]}, got {''.join(sorted(found))!r}")
    k = len(found)
    if countdown and groups[0][0] != LETTERS[k - 1]:
        raise ValueError(f"a countdown problem starts with its highest tag {LETTERS[k - 1]!r}: {problem!r}")
    return int(m.group(1)) % MOD, [found[tag(i, k, countdown)] for i in range(k)]


def format_prompt(problem_text: str) -> str:
    """The plain prompt the models see: the problem text and a newline (no chat template)."""
    return problem_text.strip() + "\n"


def solve(problem: str, countdown: bool = True) -> str:
    """The reference chain of thought for a problem text (one fixed-width line per step)."""
    x, ops = parse_problem(problem, countdown)
    lines = []
    for i, (op, d) in enumerate(ops):
        y = apply_op(x, op, d)
        lines.append(f"{x:02d} {tag(i, len(ops), countdown)}{op}{d}={y:02d}")
        x = y
    lines.append(f"{ANSWER_PREFIX}{x:02d}")
    return "\n".join(lines)


def answer_of(problem: str, countdown: bool = True) -> str:
    """The reference answer (two digits, zero padded)."""
    x, ops = parse_problem(problem, countdown)
    for op, d in ops:
        x = apply_op(x, op, d)
    return f"{x:02d}"


def trace_length(k: int) -> int:
    """Characters (= tokens) of the reference solution for ``k`` steps, without eos."""
    return LINE_WIDTH * k + len(ANSWER_PREFIX) + 2


def extract_answer(response_text: str) -> str | None:
    """The ``N`` of the last line of the response that is exactly ``answer: N`` (None when there is none)."""
    if not isinstance(response_text, str):
        return None
    found = _ANSWER_RE.findall(response_text)
    return found[-1] if found else None


def grade_chain(response_text: str, answer: str | int) -> int:
    """1 when the last ``answer: N`` line of the response equals ``answer`` as an integer, else 0.

    Exact: an integer compare of the parsed digits (no eval, no mod); garbage, a missing answer line or
    an unparsable reference all grade 0.
    """
    found = extract_answer(response_text)
    if found is None:
        return 0
    try:
        return int(int(found) == int(str(answer).strip()))
    except ValueError:
        return 0


class ChainTask:
    """Problem generator. ``k`` is an int or an inclusive ``(lo, hi)`` range drawn uniformly per problem.

    ``sample_problem(rng)`` -> ``(problem_text, answer_str, solution_text)``; without ``rng`` the task's
    own stream (seeded by ``seed``) is used. Iterating yields problems from that stream forever.
    """

    def __init__(self, k: int | tuple[int, int], seed: int | str = 0):
        lo, hi = (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))
        if not 1 <= lo <= hi <= MAX_K:
            raise ValueError(f"k must lie in 1..{MAX_K}, got {k!r}")
        self.k_range = (lo, hi)
        self.seed = seed
        self.rng = random.Random(seed if isinstance(seed, str) else f"opdkit-chain-{seed}")

    def sample_problem(self, rng: random.Random | None = None) -> tuple[str, str, str]:
        rng = rng or self.rng
        problem = random_problem(rng, rng.randint(*self.k_range))
        return problem, answer_of(problem), solve(problem)

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        while True:
            yield self.sample_problem()


def make_benchmark(k: int, n: int = BENCHMARK_SIZE, seed: int = BENCHMARK_SEED,
                   name: str | None = None) -> list[dict]:
    """``n`` distinct problems with ``k`` steps, rows ``{id, problem, answer, source, k, solution}``."""
    name = name or f"chain{k}"
    task = ChainTask(k, seed=f"opdkit-chain-bench-{k}-{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        problem, answer, solution = task.sample_problem()
        if problem in seen:
            continue
        seen.add(problem)
        rows.append({"id": f"{name}-{len(rows)}", "problem": problem, "answer": answer,
                     "source": f"opdkit chain k={k} seed={seed}", "k": k, "solution": solution})
    return rows


def benchmarks(n: int = BENCHMARK_SIZE, seed: int = BENCHMARK_SEED) -> dict[str, list[dict]]:
    """The four held-out benchmarks ``chain8``, ``chain12``, ``chain16``, ``chain24``."""
    return {name: make_benchmark(k, n, seed, name) for name, k in BENCHMARK_KS.items()}


def _held_out_problems() -> set[str]:
    return {r["problem"] for rows in benchmarks().values() for r in rows}


def train_stream(seed: int = 0, k_range: tuple[int, int] = TRAIN_K_RANGE) -> Iterator[tuple[str, str, str]]:
    """Infinite deterministic stream of training problems, disjoint from the default benchmarks."""
    held_out = _held_out_problems()
    task = ChainTask(k_range, seed=f"opdkit-chain-train-{seed}")
    for item in task:
        if item[0] not in held_out:
            yield item


def make_train_prompts(n: int, seed: int = 0, k_range: tuple[int, int] = TRAIN_K_RANGE) -> list[dict]:
    """The first ``n`` training problems as rows with the benchmark schema (for OPD rollouts)."""
    rows = []
    for i, (problem, answer, solution) in zip(range(n), train_stream(seed, k_range)):
        rows.append({"id": f"chain-train-{i}", "problem": problem, "answer": answer,
                     "source": f"opdkit chain train k={k_range[0]}..{k_range[1]} seed={seed}",
                     "k": len(parse_problem(problem)[1]), "solution": solution})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chain_tokenizer():
    """Character tokenizer with exactly :data:`ALPHABET` plus the three specials (46 tokens)."""
    from opdkit.tokenizer import char_tokenizer

    return char_tokenizer(ALPHABET)


_STEP_LINE_RE = re.compile(r"^\d+ [a-z][+\-*]\d=\d+$")


def trace_errors(problem: str, response_text: str) -> dict:
    """How a response's trace departs from the reference solution of ``problem``.

    Returns ``{"k", "steps", "correct_prefix", "kind", "reference"}``: the steps the problem needs, the step
    lines the response wrote (lines shaped like ``37 a+5=42``), how many leading lines equal the reference's,
    ``kind``: ``exact`` (k steps), ``short`` (stopped before step k) or ``long`` (ran past step k), and
    ``reference``: the response is the reference solution, every step line and the answer line.
    A response can have the right number of steps and still be wrong (a slip inside a line), and a wrong
    trace can still end on the right answer (by chance: every operation is a bijection modulo 100, so one
    in about a hundred), which the answer grader counts as solved; ``reference`` does not.
    """
    full = solve(problem).split("\n")
    ref = full[:-1]
    lines = [ln.strip() for ln in str(response_text).strip().split("\n")]
    steps = sum(1 for ln in lines if _STEP_LINE_RE.match(ln))
    prefix = 0
    for got, want in zip(lines, ref):
        if got != want:
            break
        prefix += 1
    k = len(ref)
    kind = "exact" if steps == k else ("short" if steps < k else "long")
    return {"k": k, "steps": steps, "correct_prefix": prefix, "kind": kind, "reference": lines == full}
