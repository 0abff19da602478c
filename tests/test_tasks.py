"""The chain task, its verifier and tokenizer, and the shipped miniature checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import opdkit
from opdkit.tasks.chain import (
    ALPHABET,
    BENCHMARK_KS,
    BENCHMARK_SIZE,
    DIGITS,
    LETTERS,
    MOD,
    MUL_DIGITS,
    OPS,
    ChainTask,
    answer_of,
    apply_op,
    benchmarks,
    chain_tokenizer,
    format_prompt,
    grade_chain,
    make_benchmark,
    make_train_prompts,
    parse_problem,
    random_op,
    random_problem,
    read_jsonl,
    solve,
    trace_length,
    write_jsonl,
)

ASSETS = Path(opdkit.__file__).parent / "assets" / "miniature"


def _corrupt_answer(solution: str) -> str:
    head, last = solution.rsplit("\n", 1)
    digits = last[-2:]
    bad = f"{digits[0]}{(int(digits[1]) + 1) % 10}"
    return f"{head}\n{last[:-2]}{bad}"


def test_reference_solutions_grade_correct_and_corruptions_incorrect():
    rng = random.Random(123)
    task = ChainTask((1, 26), seed=5)
    for _ in range(300):
        problem, answer, solution = task.sample_problem(rng)
        assert solve(problem) == solution
        assert answer_of(problem) == answer
        assert grade_chain(solution, answer) == 1
        assert grade_chain(_corrupt_answer(solution), answer) == 0
        # each line is the op applied to the previous state, fixed width
        lines = solution.split("\n")
        assert all(len(line) == 9 for line in lines[:-1])
        assert lines[-1] == f"answer: {answer}"


def test_solution_checks_arithmetic_by_hand():
    # countdown (shipped): the first listed op runs first, tags count down to a, the last step
    assert solve("37 c+5 a-7 b*3") == "37 c+5=42\n42 b*3=26\n26 a-7=19\nanswer: 19"
    assert solve("03 a-9") == "03 a-9=94\nanswer: 94"
    assert parse_problem("37 b+5 a*3") == (37, [("+", 5), ("*", 3)])
    with pytest.raises(ValueError, match="highest tag"):
        parse_problem("37 a+5 b*3")
    # the first format (curriculum phases A and B): tags count up from a, all ops shuffled
    assert solve("37 b*3 a+5 c-7", countdown=False) == "37 a+5=42\n42 b*3=26\n26 c-7=19\nanswer: 19"
    assert parse_problem("37 a+5 b*3", countdown=False) == (37, [("+", 5), ("*", 3)])
    assert answer_of("37 b*3 a+5 c-7", countdown=False) == "19"
    with pytest.raises(ValueError):
        parse_problem("37 b+5")
    with pytest.raises(ValueError):
        parse_problem("print(1)")


def test_grade_handles_garbage_and_uses_last_answer_line():
    assert grade_chain("", "19") == 0
    assert grade_chain("no answer here", "19") == 0
    assert grade_chain("answer: ", "19") == 0
    assert grade_chain("answer: 1x9", "19") == 0
    assert grade_chain("answer: __import__('os')", "19") == 0
    assert grade_chain(None, "19") == 0
    assert grade_chain("answer: 19", "not a number") == 0
    assert grade_chain("answer: 19", "19") == 1
    assert grade_chain("answer: 19", 19) == 1
    assert grade_chain("answer: 7", "07") == 1
    assert grade_chain("answer: 19\nanswer: 20", "19") == 0
    assert grade_chain("answer: 20\nanswer: 19", "19") == 1
    assert grade_chain("19 a+0=19 answer: 19", "19") == 0  # must be its own line


def test_every_operation_is_a_bijection_of_the_state():
    # brute force over every state: a one-to-one step means a slip is never undone by a later step, so a
    # wrong trace reaches the right answer only by chance (the answer grader's lucky answers, #13)
    for op in OPS:
        for d in MUL_DIGITS if op == "*" else DIGITS:
            assert sorted(apply_op(x, op, d) for x in range(MOD)) == list(range(MOD)), (op, d)
    rng = random.Random(0)
    drawn = {random_op(rng) for _ in range(2000)}
    assert drawn == {(op, d) for op in OPS for d in (MUL_DIGITS if op == "*" else DIGITS)}
    for row in make_benchmark(24, 64, seed=0):
        assert all(d in MUL_DIGITS for op, d in parse_problem(row["problem"])[1] if op == "*")


def test_tokenizer_covers_every_generated_char():
    tok = chain_tokenizer()
    assert len(tok) == len(ALPHABET) + 3 == 46
    rng = random.Random(0)
    task = ChainTask((1, 26), seed=1)
    for _ in range(50):
        problem, _, solution = task.sample_problem(rng)
        text = format_prompt(problem) + solution
        assert set(text) <= set(ALPHABET)
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == len(text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_operations_are_shuffled_in_the_shipped_task_and_in_order_on_request():
    # shipped task: the first step's op (the highest tag) first, the others shuffled; the last step is a
    import random

    for name, rows in benchmarks(n=20).items():
        k = BENCHMARK_KS[name]
        tags = [[g[0] for g in r["problem"].split()[1:]] for r in rows]
        assert all(sorted(t) == list(LETTERS[:k]) and t[0] == LETTERS[k - 1] for t in tags)
        assert any(t[1:] != sorted(t[1:], reverse=True) for t in tags)
        assert all(solve(r["problem"]).split("\n")[-2].split()[1][0] == "a" for r in rows)
    rng = random.Random(0)
    for k in (3, 8, 24):
        problem = random_problem(rng, k, shuffle=False)
        assert [g[0] for g in problem.split()[1:]] == list(LETTERS[:k])[::-1]
        assert solve(problem).split("\n")[-2].split()[1].startswith(problem.split()[-1] + "=")


def test_both_formats_draw_the_same_problems():
    # the curriculum's first format and the countdown format differ only in tags and listing order
    import random

    for k in (1, 5, 24):
        a = random_problem(random.Random(k), k)
        b = random_problem(random.Random(k), k, countdown=False)
        assert answer_of(a) == answer_of(b, countdown=False)
        ra = [line.split()[1][1:] for line in solve(a).split("\n")[:-1]]
        rb = [line.split()[1][1:] for line in solve(b, countdown=False).split("\n")[:-1]]
        assert ra == rb  # the same ops run in the same order


def test_benchmarks_have_enough_problems_and_other_seeds_differ():
    assert BENCHMARK_SIZE >= 128  # README's tables: >= 128 problems per benchmark
    rows = make_benchmark(12)
    assert len(rows) == BENCHMARK_SIZE
    assert rows[:64] == make_benchmark(12, 64)  # a smaller n is a prefix of the same stream
    other = make_benchmark(12, seed=3, name="chain12@3")
    assert other[0]["id"] == "chain12@3-0"
    assert not {r["problem"] for r in rows} & {r["problem"] for r in other}


def test_trace_length_k12():
    problem, _, solution = ChainTask(12, seed=0).sample_problem()
    assert len(solution) == trace_length(12) == 130
    assert len(chain_tokenizer()(solution).input_ids) == 130  # + eos = 131 tokens


def test_benchmarks_deterministic_and_disjoint_from_training(tmp_path):
    a, b = benchmarks(), benchmarks()
    assert a == b
    assert set(a) == set(BENCHMARK_KS)
    for name, rows in a.items():
        assert len({r["problem"] for r in rows}) == len(rows)
        assert {"id", "problem", "answer", "source"} <= set(rows[0])
        assert all(len(parse_problem(r["problem"])[1]) == BENCHMARK_KS[name] for r in rows)
        assert all(grade_chain(r["solution"], r["answer"]) for r in rows)
    assert make_benchmark(12, 10, seed=1) != make_benchmark(12, 10, seed=0)
    held = {r["problem"] for rows in a.values() for r in rows}
    train = make_train_prompts(2000)
    assert train == make_train_prompts(2000)
    assert not held & {r["problem"] for r in train}
    ks = {r["k"] for r in train}
    assert min(ks) == 4 and max(ks) == 24
    p = write_jsonl(a["chain8"], tmp_path / "c8.jsonl")
    assert read_jsonl(p) == a["chain8"]


@pytest.fixture(scope="module")
def teacher():
    if not (ASSETS / "teacher" / "model.safetensors").exists():
        pytest.fail(f"shipped teacher checkpoint missing under {ASSETS}")
    from opdkit.runtime.models import load_model, load_tokenizer

    return load_model(ASSETS / "teacher", device="cpu"), load_tokenizer(ASSETS / "teacher")


def test_shipped_checkpoints_load_and_teacher_solves_chain12(teacher):
    import torch

    from opdkit.runtime.models import load_model, load_tokenizer

    model, tok = teacher
    assert tok.get_vocab() == chain_tokenizer().get_vocab()
    student = load_model(ASSETS / "student", device="cpu")
    assert load_tokenizer(ASSETS / "student").get_vocab() == tok.get_vocab()
    # the student has the teacher's shape (prepare.CURRICULUM_STUDENT_SPEC) but is its own, under-trained model
    assert student.num_parameters() == model.num_parameters()
    assert not torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight)

    rows = make_benchmark(12, 5)
    tok.padding_side = "left"
    enc = tok([format_prompt(r["problem"]) for r in rows], return_tensors="pt", padding=True,
              add_special_tokens=False)

    def greedy_correct(m):
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=trace_length(12) + 5, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return sum(grade_chain(t, r["answer"]) for t, r in zip(texts, rows)), texts

    correct, texts = greedy_correct(model)
    assert correct >= 4, texts
    # measured: teacher 5/5, student 0/5 greedy on these problems (on chain8 4/5: it has learned short
    # chains); the gap is what OPD has to close
    assert greedy_correct(student)[0] < correct
