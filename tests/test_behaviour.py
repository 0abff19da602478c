"""Behaviour log-probs recomputed with the training forward: the first update's drift is exactly 0 even
when the sampler's log-probs disagree with the training forward (train.behaviour_logprobs). The first
update's rows take their values from that update's own forward (no separate forward for them), with the
same results as a separate recompute of every row; SG-OPD recomputes every row beforehand."""

import pytest
import torch
from safetensors.torch import load_file

from opdkit.config import ConfigError, load_config
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.train import step as step_mod
from opdkit.train.behaviour import recompute_behaviour_logprobs, resolve_behaviour_logprobs
from opdkit.train.loop import train
from opdkit.train.setup import build_update_spec
from opdkit.train.telemetry import read_metrics
from opdkit.train.update import FORWARD_BEHAVIOUR, run_update

NOISE = 0.05  # nats added to every sampled-token log-prob: a sampler that disagrees with the update


def _perturbed_sampler(monkeypatch):
    real = step_mod.sample_rollouts

    def sample(*args, **kwargs):
        batch = real(*args, **kwargs)
        mask = batch.response_mask_BT.bool()
        batch.logp_old_BT = torch.where(mask, batch.logp_old_BT - NOISE, batch.logp_old_BT)
        return batch

    monkeypatch.setattr(step_mod, "sample_rollouts", sample)


def _run(tiny_models, out, source, *extra):
    student, teacher, data = tiny_models
    cfg = load_config(None, [
        f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
        "data.prompt_template={problem}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6", "train.train_steps=1", "train.rollout_passes=2",
        "train.minibatches_per_pass=2", "train.microbatch_size=3", "gate.name=block", "gate.block_size=2",
        "train.progress=false", "train.save_every_steps=0", "optim.lr=1e-3", "train.device=cpu",
        f"train.behaviour_logprobs={source}", f"train.output_dir={out}", *extra])
    train(cfg, print_fn=lambda *a: None)
    return read_metrics(out / "metrics.jsonl", "step")[0], read_metrics(out / "metrics.jsonl", "update")


def test_recomputed_behaviour_logprobs_make_the_first_drift_exactly_zero(tiny_models, tmp_path, monkeypatch):
    _perturbed_sampler(monkeypatch)
    step, updates = _run(tiny_models, tmp_path / "recompute", "recompute")
    assert step["drift_pass0"] == 0.0 and updates[0]["drift_abs_mean"] == 0.0
    assert updates[0]["gate_min"] == 1.0 and updates[0]["gate_max"] == 1.0
    # the sampler's disagreement is measured (float32 rounding of the recomputed values aside)
    assert step["behaviour_logp_abs_diff"] == pytest.approx(NOISE, rel=1e-4)
    # later updates of the same batch drift (the student moved): the recompute only fixes the reference
    assert updates[-1]["drift_abs_mean"] > 0.0

    step, updates = _run(tiny_models, tmp_path / "sampler", "sampler")
    assert step["drift_pass0"] == pytest.approx(NOISE, rel=1e-3)  # the noise the gate would see as drift
    assert "behaviour_logp_abs_diff" not in step


def test_cpu_bf16_autocast_samples_in_bf16_and_recomputes_behaviour_logprobs(tiny_models, tmp_path, monkeypatch):
    """train.autocast=bf16 on CPU: the sampler decodes a bf16 copy (its log-probs differ from the autocast
    update by bf16 rounding), so behaviour_logprobs=auto recomputes them and the first drift is exactly 0."""
    from opdkit.rollout import sampler

    dtypes = []
    real = sampler._sampling_model
    monkeypatch.setattr(sampler, "_sampling_model", lambda model, dtype: dtypes.append(dtype) or real(model, dtype))
    step, updates = _run(tiny_models, tmp_path / "bf16", "auto", "train.autocast=bf16")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert step["drift_pass0"] == 0.0 and updates[0]["drift_abs_mean"] == 0.0
    assert step["behaviour_logp_abs_diff"] > 0.0  # the bf16 sampler is measurably off the update's forward
    step32, _ = _run(tiny_models, tmp_path / "f32", "auto", "train.autocast=off")
    assert "behaviour_logp_abs_diff" not in step32  # float32 throughout: auto keeps the sampler's values
    with pytest.raises(ConfigError, match="train.autocast = 'fp8' is not valid; choose one of auto"):
        load_config(None, ["train.autocast=fp8"], need_models=False)


def test_behaviour_logprobs_auto_is_on_for_cuda_only_and_names_are_checked():
    assert resolve_behaviour_logprobs("auto", torch.device("cuda")) is True
    assert resolve_behaviour_logprobs("auto", torch.device("cpu")) is False
    assert resolve_behaviour_logprobs("auto", torch.device("cpu"), mixed=True) is True  # train.autocast=bf16
    assert resolve_behaviour_logprobs("recompute", torch.device("cpu")) is True
    assert resolve_behaviour_logprobs("sampler", torch.device("cuda")) is False
    with pytest.raises(ConfigError, match="train.behaviour_logprobs = 'always' is not valid; choose one of auto"):
        load_config(None, ["train.behaviour_logprobs=always"], need_models=False)


# ---------------------------------------------- the first update's rows come from that update's own forward
UPDATE_KEYS = ("loss", "grad_norm", "clip_frac", "drift_abs_mean", "sampled_rkl", "gate_mean", "gate_std",
               "gate_min", "gate_max", "gate_raw_mean", "gate_raw_std", "gate_raw_min", "gate_raw_max")


def _spy_recompute(monkeypatch) -> list[dict]:
    """Record every separate recompute: its ``skip_minibatches`` and the rows whose log-probs it changed
    (the perturbed sampler is off by NOISE on every response token, so every recomputed row changes)."""
    calls, real = [], step_mod.recompute_behaviour_logprobs

    def spy(model, batch, order, **kw):
        out, diff = real(model, batch, order, **kw)
        changed = (out.logp_old_BT != batch.logp_old_BT).any(dim=1).nonzero().flatten().tolist()
        calls.append({"skip": kw.get("skip_minibatches", 0), "rows": set(changed), "order": order})
        return out, diff

    monkeypatch.setattr(step_mod, "recompute_behaviour_logprobs", spy)
    return calls


@pytest.mark.parametrize("passes,k", [(1, 1), (2, 2)])
def test_first_update_takes_behaviour_logprobs_from_its_own_forward(tiny_models, tmp_path, monkeypatch, passes, k):
    _perturbed_sampler(monkeypatch)
    calls = _spy_recompute(monkeypatch)
    step, updates = _run(tiny_models, tmp_path, "recompute", f"train.rollout_passes={passes}",
                         f"train.minibatches_per_pass={k}")
    assert len(updates) == passes * k
    assert step["drift_pass0"] == 0.0 and updates[0]["drift_abs_mean"] == 0.0
    assert updates[0]["gate_min"] == 1.0 and updates[0]["gate_max"] == 1.0
    assert updates[0]["gate_raw_min"] == 1.0 and updates[0]["gate_raw_max"] == 1.0
    # over all 8 rows: update 0's rows from its forward, the others' from the recompute
    assert step["behaviour_logp_abs_diff"] == pytest.approx(NOISE, rel=1e-4)
    if k == 1:
        assert calls == []  # one update per pass: no separate forward at all
    else:
        (call,) = calls
        assert call["skip"] == 1 and call["rows"] == set(call["order"][4:])  # mini-batch 1 of pass 0 only


# Tolerances: the shortcut and the full recompute differ only in whether the behaviour log-probs come from
# the no-grad forward or from the update's grad forward of the same micro-batches. On CPU (float32 and bf16
# autocast) the two give bitwise the same float32 values, so the runs are identical; should a platform round
# them differently, each log-prob moves by about one float32 ulp, so a metric (a mean over a few dozen
# tokens) by a few eps32 relative, and the weights as torch's float32 comparison defaults allow.
METRIC_TOL = {"rel": 16 * torch.finfo(torch.float32).eps, "abs": 1e-6}


@pytest.mark.parametrize("extra", [("train.autocast=off",), ("train.autocast=bf16",),
                                   ("loss.name=opd_tis", "loss.advantage=recompute", "gate.statistic=abs_mean")])
def test_shortcut_matches_the_full_recompute(tiny_models, tmp_path, monkeypatch, extra):
    """Every update's metrics and the final weights agree with a separate no-grad recompute of every row
    (forced by switching the shortcut off), over 2 rollout steps of 2 passes x 2 mini-batches."""
    _perturbed_sampler(monkeypatch)
    calls = _spy_recompute(monkeypatch)
    step_a, upd_a = _run(tiny_models, tmp_path / "shortcut", "recompute", "train.train_steps=2", *extra)
    assert [(c["skip"], len(c["rows"])) for c in calls] == [(1, 4), (1, 4)]
    monkeypatch.setattr(step_mod, "behaviour_from_forward", lambda t: False)  # the full recompute
    step_b, upd_b = _run(tiny_models, tmp_path / "full", "recompute", "train.train_steps=2", *extra)
    assert [(c["skip"], len(c["rows"])) for c in calls[2:]] == [(0, 8), (0, 8)]
    assert len(upd_a) == len(upd_b) == 8
    for i, (a, b) in enumerate(zip(upd_a, upd_b)):
        for key in UPDATE_KEYS:
            assert a[key] == pytest.approx(b[key], **METRIC_TOL), (i, key)
    assert step_a["behaviour_logp_abs_diff"] == pytest.approx(step_b["behaviour_logp_abs_diff"], **METRIC_TOL)
    assert step_a["drift_pass0"] == step_b["drift_pass0"] == 0.0
    wa = load_file(str(tmp_path / "shortcut" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], msg=name)


def test_run_update_returns_the_behaviour_logprobs_of_its_forward(tiny_models):
    """``behaviour_from_forward``: the returned log-probs are the no-grad recompute's (same micro-batches,
    trimmed to other widths, padding kept), the sums are |sampler - forward| over response tokens, and the
    private entry is there only when asked for."""
    student, teacher, data = tiny_models
    cfg = load_config(None, [f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
                             "gate.name=block", "gate.block_size=2", "train.device=cpu"])
    tok = load_tokenizer(student)
    prompts = [tok(f"{i}*{i}=")["input_ids"] for i in range(3)]
    batch = sample_rollouts(load_model(student), prompts, SamplingParams(max_new_tokens=7, samples_per_prompt=2),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    batch = score_with_teacher(load_model(teacher), batch, topk=4)
    mask = batch.response_mask_BT.bool()
    batch.logp_old_BT = torch.where(mask, batch.logp_old_BT - NOISE, batch.logp_old_BT)
    spec = build_update_spec(cfg, tok, None)
    spec.microbatch_size = 4  # micro-batches of 4 and 2 rows, each trimmed to its own longest response
    model = load_model(student)
    ref, diff = recompute_behaviour_logprobs(model, batch, list(range(batch.size)), minibatches=1,
                                             microbatch_size=4, chunk_size=spec.chunk_size, vocab_limit=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    m = run_update(model, opt, sched, batch, spec, behaviour_from_forward=True)
    fb = m.pop(FORWARD_BEHAVIOUR)
    assert all(isinstance(v, float) for v in m.values())
    assert m["drift_abs_mean"] == 0.0 and m["gate_raw_min"] == 1.0
    assert fb.logp_old_BT.shape == batch.logp_old_BT.shape
    torch.testing.assert_close(fb.logp_old_BT, ref.logp_old_BT)
    assert torch.equal(fb.logp_old_BT[~mask], batch.logp_old_BT[~mask])  # padding keeps the batch's values
    assert fb.diff.tokens == diff.tokens == float(mask.sum())
    assert fb.diff.abs_sum / fb.diff.tokens == pytest.approx(NOISE, rel=1e-4)
    assert FORWARD_BEHAVIOUR not in run_update(model, opt, sched, batch, spec)


def test_sg_opd_recomputes_every_row_before_the_update(tiny_models, tmp_path, monkeypatch):
    """SG-OPD's sign-gated advantage reads log pi_old on the whole batch before any update, so its rows
    cannot wait for the first update's forward: the separate recompute covers all of them."""
    _perturbed_sampler(monkeypatch)
    calls = _spy_recompute(monkeypatch)
    step, updates = _run(tiny_models, tmp_path, "recompute", "loss.advantage=sign_gated", "rollout.reward=math",
                         "sg.phase_steps=0")
    assert [(c["skip"], len(c["rows"])) for c in calls] == [(0, 8)]
    assert step["drift_pass0"] == 0.0 and updates[0]["gate_min"] == 1.0 and updates[0]["gate_max"] == 1.0
    assert step["behaviour_logp_abs_diff"] == pytest.approx(NOISE, rel=1e-4)
