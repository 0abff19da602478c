"""Issue #16 fidelity fixes, each pinned by a test that fails on the code before the fix:
sampled-OPD diagnostic direction with full-vocabulary masses (docs/methods.md §6), gate telemetry of the
normalised gate in every scope (§4), SG-OPD's NLL term split across the mini-batches of a pass, binary
endorsement and the teacher's own generator (§5.2), and the diagnostic LSM support size in the report (§6)."""

from __future__ import annotations

import math

import pytest
import torch

from opdkit.config import load_config
from opdkit.diagnose import directions as D
from opdkit.diagnose.alignment import node_record
from opdkit.diagnose.nodes import NodeProbe
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.scoring import response_logprobs
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------- 1. opd_sampled: full-vocabulary advantage
def _issue_probe() -> NodeProbe:
    """The issue's example: sampled y = 0 with p_y = 0.3, q_y = 0.27 over the full vocabulary (V = 5), and
    the candidate set C = {0, 1, 2} holding p-mass 0.9 and q-mass 0.5."""
    p_V = torch.tensor([0.3, 0.4, 0.2, 0.06, 0.04], dtype=F64)
    q_V = torch.tensor([0.27, 0.13, 0.10, 0.3, 0.2], dtype=F64)
    return NodeProbe(pos=0, sampled_id=0, union_ids_U=torch.tensor([0, 1, 2]), student_logits_V=p_V.log(),
                     teacher_logits={"t": q_V.log()}, cand_idx={"t": [0, 1, 2]}, rewards_UM=torch.zeros(3, 1),
                     psucc_U=torch.tensor([1.0, 0.0, 0.0]))


def test_opd_sampled_uses_full_vocabulary_log_ratio():
    _, g, dirs = node_record(_issue_probe(), "t", ["opd_sampled"])
    d_C = dirs["opd_sampled"]
    p_C = torch.tensor([0.3, 0.4, 0.2], dtype=F64) / 0.9
    adv = math.log(0.27) - math.log(0.3)  # the trainer's A = log q_y − log π_old,y: −0.105
    assert adv == pytest.approx(-0.10536, abs=1e-5)
    torch.testing.assert_close(d_C, D.sampled_direction(p_C, 0, adv), atol=1e-12, rtol=0)
    assert d_C[0] < 0  # renormalised on C the advantage is +0.48 and pushes the sampled token up instead
    # the same through NodeTensors directly: the masses undo the renormalisation
    q_C = torch.tensor([0.27, 0.13, 0.10], dtype=F64) / 0.5
    n = D.NodeTensors(p_C=p_C, q_C=q_C, psucc_C=torch.zeros(3, dtype=F64), teacher_topk_C=torch.ones(3, dtype=bool),
                      sampled=0, future_C=torch.zeros(3, dtype=F64), p_mass=0.9, q_mass=0.5)
    torch.testing.assert_close(D.get_method("opd_sampled")(n), d_C, atol=1e-12, rtol=0)


# --------------------------------------------------------- 2. gate telemetry: normalised gate in every scope
def _cfg(tiny_models, out, *extra):
    student, teacher, data = tiny_models
    return load_config(None, [
        f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
        "data.max_prompt_tokens=64", "data.prompt_template={problem}", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "rollout.reward=math", "loss.topk=4",
        "train.train_steps=1", "train.progress=false", "train.save_every_steps=0", "optim.lr=1e-3",
        "train.device=cpu", f"train.output_dir={out}", *extra])


def _batch(tiny_models, n_prompts=4):
    student, teacher, _ = tiny_models
    tok = load_tokenizer(student)
    prompts = [tok(f"{i}*{i}=")["input_ids"] for i in range(n_prompts)]
    batch = sample_rollouts(load_model(student), prompts, SamplingParams(max_new_tokens=7, samples_per_prompt=2),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    return tok, score_with_teacher(load_model(teacher), batch, topk=4)


def _drifted(student):
    torch.manual_seed(0)
    model = load_model(student)
    with torch.no_grad():  # the current policy moves away from the behaviour one, so gates differ from 1
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_gate_telemetry_is_of_the_normalised_gate_in_every_scope(tiny_models, tmp_path, scope):
    from opdkit.gates.drift import drift_gate, normalize_gate
    from opdkit.train.setup import build_update_spec
    from opdkit.train.update import run_update

    cfg = _cfg(tiny_models, tmp_path, "gate.name=token", f"gate.normalize={scope}", "optim.max_grad_norm=0")
    tok, batch = _batch(tiny_models)
    spec = build_update_spec(cfg, tok, None)
    spec.microbatch_size = 3  # several micro-batches: the batch scope's mean is over all of them
    model = _drifted(tiny_models[0])
    with torch.no_grad():  # reference: the gate of §4 on the whole update batch, before the step moves the model
        logp = response_logprobs(model, batch).logp_BT
        mask = batch.response_mask_BT.float()
        seg = spec.segmenter(batch.response_ids_BT, mask, spec.segment_params)
        raw = drift_gate(logp, batch.logp_old_BT, mask, seg, tau=spec.tau).double()
    norm = normalize_gate(raw, mask, scope=scope)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = run_update(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0), batch, spec)
    valid = mask > 0
    for prefix, g in (("gate", norm[valid]), ("gate_raw", raw[valid])):
        ref = {"mean": g.mean(), "std": g.std(unbiased=False), "min": g.min(), "max": g.max()}
        # the gate values are float32: per-micro-batch recomputation and float32 sums move each by a few eps32
        tol = 64 * EPS32 * float(g.max())
        for k, v in ref.items():
            assert m[f"{prefix}_{k}"] == pytest.approx(float(v), abs=tol), (prefix, k)
    assert m["gate_raw_max"] <= 1.0 + tol < m["gate_max"]  # the raw gate is <= 1; the normalised one is not
    if scope == "batch":
        assert m["gate_mean"] == pytest.approx(1.0, abs=tol)


# -------------------------------------------------------------------------- 3-5. SG-OPD phased sampling
def _trainer(tiny_models, tmp_path, *extra):
    from opdkit.train.setup import trainer_from_parts

    student, teacher, _ = tiny_models
    cfg = _cfg(tiny_models, tmp_path, "loss.advantage=sign_gated", "sg.phase_steps=2", "train.train_steps=4",
               *extra)
    tok = load_tokenizer(student)
    return trainer_from_parts(cfg, load_model(student), load_model(teacher), tok, vocab=None)


def _prompts(t, n=2):
    from opdkit.train.step import StepPrompts

    return StepPrompts([t.tok(f"{i}+{i}=")["input_ids"] for i in range(n)], [str(2 * i) for i in range(n)],
                       list(range(n)))


def test_teacher_sampling_leaves_the_student_samples_unchanged(tiny_models, tmp_path):
    from opdkit.train.step import endorsed_teacher_samples, sample

    with_teacher, without = _trainer(tiny_models, tmp_path), _trainer(tiny_models, tmp_path)
    prompts = _prompts(with_teacher)
    a0 = sample(with_teacher, 0, prompts)
    _, _, counts = endorsed_teacher_samples(with_teacher, 0, prompts)  # draws teacher samples in between
    assert counts["teacher_sampled"] == 2 * with_teacher.cfg.sg.teacher_samples_per_prompt
    a1 = sample(with_teacher, 1, prompts)
    b0, b1 = sample(without, 0, prompts), sample(without, 1, prompts)
    for a, b in ((a0, b0), (a1, b1)):
        assert torch.equal(a.response_ids_BT, b.response_ids_BT) and torch.equal(a.logp_old_BT, b.logp_old_BT)


def test_endorsement_is_binary(tiny_models):
    from opdkit.train.sg_opd import teacher_phase

    _, teacher, _ = tiny_models
    tok = load_tokenizer(teacher)
    prompts = [tok("1+1=")["input_ids"], tok("2+2=")["input_ids"]]
    partial = [1.0, 0.5, 0.0, 0.99, 1, 0.25]  # a grader with partial credit: only full marks are endorsed
    sft, counts = teacher_phase(load_model(teacher), prompts, ["2", "4"], samples_per_prompt=3,
                                sampling=SamplingParams(max_new_tokens=5), eos_token_ids=[tok.eos_token_id],
                                pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                                decode=lambda b: ["x"] * b.size, reward_fn=lambda texts, answers: partial)
    assert counts == {"teacher_sampled": 6.0, "teacher_endorsed": 2.0}
    assert sft.size == 2 and sft.answers == ["2", "4"]  # rows 0 and 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_nll_term_counts_once_per_pass(tiny_models, tmp_path, monkeypatch, k):
    import opdkit.train.step as step_mod

    t = _trainer(tiny_models, tmp_path, "rollout.prompts_per_step=3", "train.rollout_passes=2",
                 f"train.minibatches_per_pass={k}")
    _, batch = _batch(tiny_models, n_prompts=3)
    _, sft = _batch(tiny_models, n_prompts=2)  # stands in for 4 endorsed teacher responses
    sft.rewards_B = torch.ones(sft.size)
    seen, real = [], step_mod.run_update

    def spy(*a, sft_batch=None, sft_weight=0.0, **kw):
        seen.append([] if sft_batch is None else [tuple(r) for r in sft_batch.response_ids_BT.tolist()])
        assert sft_weight == 0.5
        return real(*a, sft_batch=sft_batch, sft_weight=sft_weight, **kw)

    monkeypatch.setattr(step_mod, "run_update", spy)
    upd = step_mod.update_passes(t, 0, batch, sft, 0.5)
    assert len(upd) == len(seen) == 2 * k
    every = sorted(tuple(r) for r in sft.response_ids_BT.tolist())
    for p in range(2):  # each endorsed response enters exactly one update of each pass
        assert sorted(r for u in seen[p * k:(p + 1) * k] for r in u) == every
    assert all(u["teacher_nll"] > 0 for u, s in zip(upd, seen) if s)


# ------------------------------------------------------------ 6. the diagnostic LSM support size is labelled
def _summary(lsm_k):
    return {"methods": ["reverse_kl", "lsm"], "teachers": ["t"], "rollouts": 0, "correct": 0, "grader": "chain",
            "nodes": 0, "skipped_gstar_zero": 0, "completions": 0, "completion_tokens": 0, "sample_seconds": 0.0,
            "completions_per_s": 0.0, "completion_tokens_per_s": 0.0, "wall_seconds": 0.0, "rollout_seconds": 0.0,
            "probe_seconds": 0.0, "device": "cpu", "threads": 1, "settings": {"lsm_k": lsm_k}}


@pytest.mark.parametrize("lsm_k", [3, 5])
def test_report_labels_the_lsm_support_size(lsm_k):
    from opdkit.diagnose.report import aggregate, markdown

    s = _summary(lsm_k)
    md = markdown(s, aggregate(s, []))
    assert f"teacher's top-{lsm_k} inside each node's candidate set" in md
    assert f"| lsm (K = {lsm_k}) |" in md and "loss.topk" in md
