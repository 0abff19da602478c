"""SG-OPD (§5): reduces to plain OPD at lam=1, beta=0, no phase; gate routing; phased teacher sampling."""

import torch
from safetensors.torch import load_file

from opdkit.config import load_config, phase_steps
from opdkit.rollout.batch import RolloutBatch
from opdkit.train.loop import train
from opdkit.train.sg_opd import alpha_at, apply_sign_gate, teacher_phase
from opdkit.train.telemetry import read_metrics


def _overrides(tiny_models, out, *extra):
    student, teacher, data = tiny_models
    return [f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
            "data.prompt_template={problem}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6", "rollout.reward=math", "train.train_steps=2", "train.progress=false",
            "train.device=cpu", "optim.lr=1e-3", "gate.name=block", "gate.block_size=2",
            f"train.output_dir={out}", *extra]


def test_lam1_beta0_no_phase_is_plain_opd(tiny_models, tmp_path):
    train(load_config(None, _overrides(tiny_models, tmp_path / "plain")), print_fn=lambda *a: None)
    train(load_config(None, _overrides(tiny_models, tmp_path / "sg", "loss.advantage=sign_gated", "sg.lam=1",
                                       "sg.beta=0", "sg.phase_steps=0")), print_fn=lambda *a: None)
    a = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "sg" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_default_sg_opd_changes_the_update_and_logs(tiny_models, tmp_path):
    cfg = load_config(None, _overrides(tiny_models, tmp_path, "loss.advantage=sign_gated", "sg.phase_steps=1"))
    train(cfg, print_fn=lambda *a: None)
    steps = read_metrics(tmp_path / "metrics.jsonl", "step")
    assert {"sg_agree_frac", "sg_adv_agree", "sg_adv_disagree", "solve_rate"} <= set(steps[0])
    assert steps[0]["teacher_sampled"] == 2 * 2 and 0 <= steps[0]["teacher_endorsed"] <= 4
    assert "teacher_sampled" not in steps[1]  # the phase lasted one step


def _hand_batch():
    # two prompts (groups 0, 1) x two samples; rewards 1,0 | 1,1
    B, T = 4, 3
    logp_old = torch.zeros(B, T)
    teacher = torch.tensor([[0.5, -0.5, 0.2], [0.5, -0.5, 0.0], [0.1, -0.1, 0.3], [-0.2, 0.4, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    b = RolloutBatch(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long),
                     torch.ones(B, T, dtype=torch.long), mask, logp_old, torch.tensor([0, 0, 1, 1]),
                     torch.tensor([0, 0, 1, 1]))
    b.teacher_logp_BT, b.rewards_B = teacher, torch.tensor([1.0, 0.0, 1.0, 1.0])
    return b


def test_sign_gate_routing_by_hand():
    b, rec = apply_sign_gate(_hand_batch(), lam=2.0, beta=0.5, baseline="group_mean")
    A = b.advantage_BT
    # row 0: R=1 (A^V = 1 - 0.5 = 0.5): +0.5 agrees -> 1.0; -0.5 disagrees -> 0.5*-0.5 + 0.5*0.5 = 0
    assert torch.allclose(A[0], torch.tensor([1.0, 0.0, 0.4]))
    # row 1: R=0 (A^V = -0.5): +0.5 disagrees -> 0.25 - 0.25 = 0; -0.5 agrees -> -1.0; padding 0
    assert torch.allclose(A[1], torch.tensor([0.0, -1.0, 0.0]))
    # row 3: group 1 all correct -> A^V = 0; -0.2 disagrees -> -0.1; +0.4 agrees -> 0.8; 0.0 disagrees -> 0
    assert torch.allclose(A[3], torch.tensor([-0.1, 0.8, 0.0]))
    assert abs(rec["sg_agree_frac"] - 6 / 11) < 1e-6


def test_alpha_schedule():
    assert [alpha_at(s, 4, 1.0) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert alpha_at(0, 0, 1.0) == 0.0
    cfg = load_config(None, ["loss.advantage=sign_gated", "train.train_steps=200"], need_models=False)
    assert phase_steps(cfg) == 40
    assert phase_steps(load_config(None, [], need_models=False)) == 0


def test_teacher_phase_keeps_only_endorsed(tiny_models):
    from opdkit.rollout.sampler import SamplingParams
    from opdkit.runtime.models import load_model, load_tokenizer

    student, teacher, _ = tiny_models
    tok, t = load_tokenizer(teacher), load_model(teacher)
    prompts = [tok("1+1=")["input_ids"], tok("2+2=")["input_ids"]]
    seen = {}

    def reward(texts, answers):  # endorse every other response
        seen["n"] = len(texts)
        return [i % 2 for i in range(len(texts))]

    sft, counts = teacher_phase(t, prompts, ["2", "4"], samples_per_prompt=3,
                                sampling=SamplingParams(max_new_tokens=5), eos_token_ids=[tok.eos_token_id],
                                pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                                decode=lambda b: ["x"] * b.size, reward_fn=reward)
    assert seen["n"] == 6 and counts == {"teacher_sampled": 6.0, "teacher_endorsed": 3.0}
    assert sft.size == 3 and sft.answers == ["2", "4", "4"]  # rows 1, 3, 5 of 2 prompts x 3 samples
    none, counts = teacher_phase(t, prompts, ["2", "4"], samples_per_prompt=1,
                                 sampling=SamplingParams(max_new_tokens=5), eos_token_ids=[tok.eos_token_id],
                                 pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                                 decode=lambda b: ["x"] * b.size, reward_fn=lambda t_, a: [0] * len(t_))
    assert none is None and counts["teacher_endorsed"] == 0
