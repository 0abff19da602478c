"""``opdkit diagnose`` with teachers that are a model plus a context (self:solution, ...): spec parsing, the
teacher's prompt at every node, the per-context comparison in the report and the HTML view."""

import json
from dataclasses import replace

import pytest
import torch

from opdkit.diagnose.contexts import parse_teacher, parse_teachers
from opdkit.runtime.settings import ConfigError


def test_parse_teacher_specs():
    assert parse_teacher("miniature") == parse_teacher("miniature")
    t = parse_teacher("self:solution")
    assert (t.name, t.model, t.context) == ("self:solution", "self", "solution")
    t = parse_teacher("/models/big:answer")
    assert (t.name, t.model, t.context) == ("big:answer", "/models/big", "answer")
    t = parse_teacher("/models/big")
    assert (t.name, t.model, t.context) == ("big", "/models/big", "")
    assert [x.name for x in parse_teachers(["self:hint", "self:hint"])] == ["self:hint", "self:hint#2"]
    with pytest.raises(ConfigError, match="needs a context"):
        parse_teacher("self")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
    from opdkit.tasks.chain import chain_tokenizer, make_benchmark, write_jsonl

    root = tmp_path_factory.mktemp("ctx")
    tok = chain_tokenizer()
    spec = TinyQwen3Spec(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=16, intermediate_size=64)
    for name, seed, s in (("student", 1, spec), ("teacher", 2, replace(spec, hidden_size=48))):
        tiny_qwen3(s, seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(
            root / name)
        tok.save_pretrained(root / name)
    write_jsonl(make_benchmark(3, 6), root / "data.jsonl")
    rows = make_benchmark(3, 2)
    for r in rows:
        del r["solution"]
    write_jsonl(rows, root / "answers_only.jsonl")
    return root


def _first_digit_grader(texts, answers):
    return [float(bool(t) and t[0] in "01234") for t in texts]


def _settings(root, out, teachers, **kw):
    from opdkit.diagnose.nodes import ProbeParams
    from opdkit.diagnose.runner import DiagnoseSettings

    base = dict(student=str(root / "student"), teachers=teachers, data=str(root / "data.jsonl"), n_rollouts=2,
                grader=_first_digit_grader, probe=ProbeParams(m=2, max_new_tokens=10, max_nodes=3), out=str(out),
                progress=False)
    return DiagnoseSettings(**{**base, **kw})


def test_self_contexts_score_under_their_prompt(models, tmp_path, monkeypatch):
    """Every context teacher's logits at a node come from its own prompt + the same response prefix."""
    import opdkit.diagnose.nodes as N
    import opdkit.diagnose.report as R
    from opdkit.diagnose.runner import diagnose

    monkeypatch.setattr(R, "plots", lambda *a: [])  # 8 matplotlib figures for 4 teachers: not what is tested here
    calls = []
    real = N.logits_at
    monkeypatch.setattr(N, "logits_at", lambda m, p, r, pos, v: calls.append((m, list(p))) or real(m, p, r, pos, v))
    teachers = [str(models / "teacher"), "self:solution", "self:answer", "self:hint"]
    summary = diagnose(_settings(models, tmp_path, teachers, hint_lines=1))
    assert summary["teachers"] == ["teacher", "self:solution", "self:answer", "self:hint"]
    assert set(summary["contexts"]) == {"self:solution", "self:answer", "self:hint"}
    rolls = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    from opdkit.tasks.chain import chain_tokenizer

    tok = chain_tokenizer()
    per_rollout = 1 + len(teachers)  # the student's forward, then each teacher's
    for i, r in enumerate(rolls):
        student_prompt = calls[i * per_rollout][1]
        texts = [tok.decode(p) for _, p in calls[i * per_rollout + 1:(i + 1) * per_rollout]]
        assert calls[i * per_rollout + 1][1] == student_prompt  # the external teacher: the student's prompt
        assert texts[2].startswith(f"answer: {r['answer']}\n") and texts[2].endswith(r["problem"] + "\n")
        assert texts[1].rstrip().endswith(r["problem"]) and "answer: " + r["answer"] in texts[1]
        assert texts[3].count("\n") == 2  # one hint line, then the problem
    # a self-teacher is the student itself: no second copy of the model
    assert len({id(m) for m, _ in calls}) == 2
    nodes = [json.loads(x) for x in (tmp_path / "nodes.jsonl").read_text().splitlines()]
    assert {n["teacher"] for n in nodes} == set(summary["teachers"])
    md = (tmp_path / "report.md").read_text()
    assert "## Teachers and contexts compared" in md and "| self:hint | `{hint}\\n{problem}\\n` | reverse_kl |" in md
    page = (tmp_path / "rollouts.html").read_text()
    assert "Teachers and contexts compared" in page and "reverse_kl by teacher: teacher " in page
    agg = json.loads((tmp_path / "aggregates.json").read_text())
    assert set(agg) == set(summary["teachers"])


def test_self_context_future_term_uses_the_context(models):
    """MiniLLM's future log-ratio of a context teacher scores the completions under its prompt: it differs
    from the same model under the student's prompt, and equals it when the context is the student's prompt."""
    import opdkit.diagnose.nodes as N
    from opdkit.runtime.models import load_model, load_tokenizer

    tok = load_tokenizer(models / "student")
    student = load_model(models / "student", device="cpu")
    prompt, resp = tok("12 a+3\n").input_ids, tok("5 6 7 8").input_ids
    kw = dict(grade=_first_digit_grader, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
              params=N.ProbeParams(m=2, max_new_tokens=10), eos_token_ids=[tok.eos_token_id],
              pad_token_id=tok.pad_token_id, vocab=len(tok), seed=3)
    ctx = tok("answer: 07\n12 a+3\n").input_ids
    a = N.probe_rollout(student, {"plain": student, "ctx": student, "same": student}, prompt, resp, "0",
                        teacher_prompts={"ctx": ctx, "same": prompt}, **kw)
    assert any(not torch.allclose(p.future_sum["plain"], p.future_sum["ctx"]) for p in a)
    assert any(not torch.equal(p.teacher_logits["plain"], p.teacher_logits["ctx"]) for p in a)
    for p in a:
        torch.testing.assert_close(p.future_sum["same"], p.future_sum["plain"], atol=1e-4, rtol=0)


def test_missing_solution_fails_before_any_rollout(models, tmp_path, monkeypatch):
    import opdkit.diagnose.report as R
    from opdkit.diagnose.runner import diagnose

    monkeypatch.setattr(R, "plots", lambda *a: [])

    s = _settings(models, tmp_path, ["self:hint"], data=str(models / "answers_only.jsonl"), n_rollouts=2)
    with pytest.raises(ValueError, match=r"--teacher self:hint uses \{hint\} but 2 of 2 problems lack"):
        diagnose(s)
    diagnose(_settings(models, tmp_path / "ok", ["self:answer"], data=str(models / "answers_only.jsonl"),
                       n_rollouts=2))
