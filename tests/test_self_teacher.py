"""Teacher contexts and self-teachers (opdkit extension): the teacher's prompt differs from the student's,
the response stays aligned row by row; contexts are filled, checked and refused before any model runs;
every base loss and gate, and SG-OPD, train with a self-teacher."""

import pytest
import torch

from opdkit.config import ConfigError, load_config
from opdkit.data import PromptSource
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.preflight import ContextError, check_context
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher, with_prompts
from opdkit.runtime.benchmarks import load_benchmark
from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
from opdkit.runtime.problems import Problem
from opdkit.runtime.prompts import context_text, hint_text, resolve_context
from opdkit.tokenizer import char_tokenizer
from opdkit.train.loop import train
from opdkit.train.step import StepPrompts, teacher_rows
from opdkit.train.telemetry import read_metrics

V, PAD, EOS = 32, 0, [2]
EPS32 = torch.finfo(torch.float32).eps
STUDENT_PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22, 23, 24, 25]]
# the teacher's prompts: longer, shorter and equal to the student's, so both paddings shift differently per row
TEACHER_PROMPTS = [[4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 6, 7], [17], [8, 3], [20, 21, 22, 23, 24, 25]]


def _model(seed, hidden=32):
    return tiny_qwen3(TinyQwen3Spec(vocab_size=V, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                                    head_dim=8, intermediate_size=64), seed=seed)


def _batch(samples=2) -> RolloutBatch:
    """Student rollouts with mixed prompt lengths (left padding) and mixed response lengths (right padding)."""
    b = sample_rollouts(_model(0), STUDENT_PROMPTS, SamplingParams(max_new_tokens=12, samples_per_prompt=samples),
                        eos_token_ids=[2, 7, 11, 13], pad_token_id=PAD, generator=torch.Generator().manual_seed(1))
    assert len(set(b.response_lengths_B.tolist())) > 1 and (b.prompt_mask_BP == 0).any()
    return b


def _reference(teacher, prompt: list[int], response: list[int], k: int):
    """One unpadded row: ``teacher(prompt + response).logits`` -> float64 log-softmax at the response tokens."""
    ids = torch.as_tensor(prompt + response)[None]
    with torch.no_grad():
        z = teacher(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(response)].double()
    y = torch.as_tensor(response)
    return torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1), z.topk(k, dim=-1)


@pytest.mark.parametrize("microbatch", [1, 3, 8])
def test_teacher_context_keeps_response_positions_aligned(microbatch):
    b = _batch()
    teacher = _model(9, hidden=48)
    rows = [p for p in TEACHER_PROMPTS for _ in range(2)]
    scored = score_with_teacher(teacher, b, topk=4, microbatch_size=microbatch, chunk_size=5, prompts=rows)
    assert torch.equal(scored.prompt_ids_BP, b.prompt_ids_BP)  # the student's prompts are kept
    plain = score_with_teacher(teacher, b, topk=4)
    for r, resp in enumerate(b.response_token_ids()):
        lp, top = _reference(teacher, rows[r], resp, 4)
        n = len(resp)
        # float32 forward vs the float64 log-softmax of the same float32 logits: the padded batch differs from
        # the single row only by float32 summation order, ~ a few hundred eps32 of the logit scale.
        tol = 512 * EPS32 * max(1.0, float(top.values.abs().max()))
        torch.testing.assert_close(scored.teacher_logp_BT[r, :n].double(), lp, atol=tol, rtol=0)
        assert torch.equal(scored.teacher_topk_ids_BTK[r, :n], top.indices)
        assert (scored.teacher_logp_BT[r, n:] == 0).all()
        if rows[r] != STUDENT_PROMPTS[r // 2]:  # the context changes the scores (the test can tell)
            assert (scored.teacher_logp_BT[r, :n] - plain.teacher_logp_BT[r, :n]).abs().max() > 100 * tol


def test_with_prompts_left_pads_every_row():
    b = _batch(samples=1)
    out = with_prompts(b, TEACHER_PROMPTS)
    P = max(map(len, TEACHER_PROMPTS))
    assert out.prompt_ids_BP.shape == (4, P)
    for r, p in enumerate(TEACHER_PROMPTS):
        assert out.prompt_ids_BP[r, P - len(p):].tolist() == p and out.prompt_mask_BP[r].sum() == len(p)
        assert out.prompt_mask_BP[r, :P - len(p)].sum() == 0
    assert torch.equal(out.response_ids_BT, b.response_ids_BT)
    with pytest.raises(ValueError, match="3 prompts for a batch of 4"):
        with_prompts(b, TEACHER_PROMPTS[:3])


def test_teacher_rows_are_prompt_major():
    p = StepPrompts([[1], [2]], teacher_ids=[[7, 1], [8, 2]])
    assert teacher_rows(p, 3) == [[7, 1]] * 3 + [[8, 2]] * 3
    assert teacher_rows(StepPrompts([[1]]), 3) is None


# --------------------------------------------------------------------------- contexts, fields, preflight


def _prob(solution=None, **kw):
    extra = {"solution": solution} if solution is not None else {}
    return Problem(id=kw.get("id", "q1"), problem=kw.get("problem", "What is 6*7?"), answer="42", extra=extra)


def test_context_fields_and_hint():
    p = _prob("Multiply 6 by 7.\n\nThat gives 42.\nSo 42.")
    assert hint_text(p.solution, 2) == "Multiply 6 by 7.\nThat gives 42."
    assert context_text("{problem}|{answer}|{hint}|{x}", p, hint_lines=1) == "What is 6*7?|42|Multiply 6 by 7.|{x}"
    assert "A reference solution:\nMultiply" in context_text(resolve_context("solution", chain=False), p)
    assert resolve_context("answer", chain=True) == "answer: {answer}\n{problem}\n"
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_context("no fields here", chain=False)


def test_chain_and_math500_rows_carry_a_solution():
    chain = load_benchmark("chain3")
    assert chain[0].solution and chain[0].solution.rstrip().endswith(f"answer: {chain[0].answer}")


def test_missing_field_fails_at_preflight_with_one_line():
    rows = [_prob("s", id="a"), _prob(None, id="b"), _prob(None, id="c")]
    with pytest.raises(ContextError) as e:
        check_context(rows, resolve_context("solution", chain=False), "{problem}")
    msg = str(e.value)
    assert "\n" not in msg and "2 of 3 problems" in msg and "'b'" in msg and "teacher.context=answer" in msg
    check_context(rows, resolve_context("answer", chain=False), "{problem}")  # answers only is fine


def test_preflight_refuses_a_context_that_leaks_into_the_student_prompt():
    with pytest.raises(ContextError, match="student's prompt template uses"):
        check_context([_prob("a long worked solution")], "{solution}\n{problem}", "{problem} {solution}")
    leaky = _prob("six times seven is 42", problem="Q: six times seven is 42. Why?")
    with pytest.raises(ContextError, match="appears in the student's own prompt"):
        check_context([leaky], "{solution}\n{problem}", "{problem}")


def test_prompt_source_builds_teacher_prompts():
    tok = char_tokenizer()
    problems = load_benchmark("chain3")[:4]
    src = PromptSource.build(problems, tok, template="", chat_template="auto", max_prompt_tokens=512,
                             context="solution", hint_lines=1)
    assert len(src.teacher_ids) == len(src.prompt_ids) == 4
    for s_ids, t_ids, p in zip(src.prompt_ids, src.teacher_ids, problems):
        text = tok.decode(t_ids, skip_special_tokens=True)
        assert text.startswith(p.solution) and text.endswith(tok.decode(s_ids, skip_special_tokens=True))
    assert PromptSource.build(problems, tok, template="", chat_template="auto", max_prompt_tokens=512).teacher_ids \
        is None


# --------------------------------------------------------------------------- training with a self-teacher


def _cfg(tiny_models, out, *extra):
    student, _, _ = tiny_models
    return load_config(None, [
        f"model.student={student}", "model.teacher=self", "teacher.context=answer: {answer}\n{problem}",
        "data.train_file=chain3", "data.max_prompt_tokens=256", "data.prompt_template={problem}",
        "data.chat_template=off", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6", "rollout.reward=chain", "loss.topk=4", "train.train_steps=1",
        "train.rollout_passes=2", "train.microbatch_size=3", "train.progress=false", "train.save_every_steps=0",
        "optim.lr=1e-3", "train.device=cpu", f"train.output_dir={out}", *extra])


def test_self_teacher_needs_a_context(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="needs teacher.context"):
        load_config(None, [f"model.student={tiny_models[0]}", "model.teacher=self", "data.train_file=chain3"])
    with pytest.raises(ConfigError, match="teacher.context"):
        _cfg(tiny_models, tmp_path, "teacher.context=plain words")


@pytest.mark.parametrize("gate", ["none", "token", "block", "newline", "sequence"])
@pytest.mark.parametrize("loss", ["opd", "lsm", "fkl", "rkl", "jsd"])
def test_every_loss_and_gate_trains_with_a_self_teacher(tiny_models, tmp_path, loss, gate):
    cfg = _cfg(tiny_models, tmp_path, f"loss.name={loss}", f"gate.name={gate}", "gate.block_size=2",
               "gate.newline_min_len=1")
    train(cfg, print_fn=lambda *a: None)
    updates = read_metrics(tmp_path / "metrics.jsonl", "update")
    assert len(updates) == 2 and all(u["skipped"] == 0 and torch.isfinite(torch.tensor(u["loss"])) for u in updates)


@pytest.mark.parametrize("teacher", ["self", "self-current"])
def test_self_teacher_scores_under_its_context(tiny_models, tmp_path, teacher, monkeypatch):
    """The teacher pass sees the context prompts; 'self' is the initial student, 'self-current' the live one
    (no gradient through it); under the student's prompt the initial self-teacher gives log q = log π_old."""
    import opdkit.train.step as step_mod

    seen = {}
    real = step_mod.score_with_teacher

    def spy(model, batch, **kw):
        out = real(model, batch, **kw)
        seen.update(model=model, prompts=kw["prompts"], grad=torch.is_grad_enabled(), batch=batch, out=out,
                    same=real(model, batch, **{**kw, "prompts": None}))
        return out

    monkeypatch.setattr(step_mod, "score_with_teacher", spy)
    cfg = _cfg(tiny_models, tmp_path, f"model.teacher={teacher}", "train.rollout_passes=1")
    from opdkit.train.setup import load_models
    student, model, _, _ = load_models(cfg, torch.device("cpu"))
    assert (model is student) == (teacher == "self-current")
    assert all(not p.requires_grad for p in model.parameters()) == (teacher == "self")
    train(cfg, print_fn=lambda *a: None)
    b, m = seen["batch"], seen["batch"].response_mask_BT.bool()
    assert seen["prompts"] is not None and len(seen["prompts"]) == b.size
    assert all(len(p) > len(s[s > 0]) for p, s in zip(seen["prompts"], b.prompt_ids_BP))
    # the same model under the student's own prompt is the behaviour policy (up to float32 recompute noise)
    gap = (seen["same"].teacher_logp_BT - b.logp_old_BT)[m].abs().max()
    assert gap < 1e-4
    assert (seen["out"].teacher_logp_BT - b.logp_old_BT)[m].abs().max() > 100 * gap


def test_sg_opd_with_a_self_teacher(tiny_models, tmp_path, monkeypatch):
    """The self-teacher samples its §5.2 responses under its context; the student learns them under its own
    prompt (the NLL batch carries the student's prompts)."""
    import opdkit.train.sg_opd as sg_mod
    import opdkit.train.step as step_mod

    seen = {}
    real_phase, real_update = step_mod.teacher_phase, step_mod.run_update

    def phase(teacher, prompts, answers, **kw):
        seen["teacher_prompts"] = prompts
        return real_phase(teacher, prompts, answers, **{**kw, "reward_fn": lambda texts, ans: [1] * len(texts)})

    def update(*a, sft_batch=None, **kw):
        if sft_batch is not None:
            seen.setdefault("sft", sft_batch)
        return real_update(*a, sft_batch=sft_batch, **kw)

    monkeypatch.setattr(step_mod, "teacher_phase", phase)
    monkeypatch.setattr(step_mod, "run_update", update)
    assert sg_mod.teacher_phase is real_phase
    cfg = _cfg(tiny_models, tmp_path, "loss.advantage=sign_gated", "sg.phase_steps=1", "train.train_steps=2")
    train(cfg, print_fn=lambda *a: None)
    steps = read_metrics(tmp_path / "metrics.jsonl", "step")
    assert steps[0]["teacher_sampled"] == 4 and "sg_agree_frac" in steps[1]
    sft = seen["sft"]
    student_prompts = [row[m.bool()].tolist() for row, m in zip(sft.prompt_ids_BP, sft.prompt_mask_BP)]
    teacher_prompts = [seen["teacher_prompts"][g] for g in sft.group_ids_B.tolist()]
    assert all(len(t) > len(s) and t[-len(s):] == s for s, t in zip(student_prompts, teacher_prompts))


def test_cli_train_with_a_self_teacher(tiny_models, tmp_path, capsys):
    from opdkit.cli.main import main

    student, _, _ = tiny_models
    common = [f"model.student={student}", "model.teacher=self", "data.train_file=chain3",
              "data.chat_template=off", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
              "rollout.max_new_tokens=5", "rollout.reward=chain", "train.train_steps=1", "train.progress=false",
              "train.device=cpu"]
    rc = main(["train", *common, "teacher.context=hint", "teacher.hint_lines=1", f"train.output_dir={tmp_path / 'a'}"])
    assert rc == 0 and (tmp_path / "a" / "final" / "model.safetensors").is_file()
    assert "hub id" not in capsys.readouterr().out  # 'self' is not looked up as a model id
    # a context the data cannot fill: one line, before any model loads or any run directory is written
    rows = tmp_path / "answers.jsonl"
    rows.write_text('{"problem": "12 a+3 | start 5 |", "answer": "8"}\n')
    rc = main(["train", *common, f"data.train_file={rows}", "teacher.context=solution",
               f"train.output_dir={tmp_path / 'b'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "uses {solution} but 1 of 1 problems lack a 'solution' field" in err
    assert not (tmp_path / "b" / "final").exists()
