"""The trainer end to end on tiny models saved locally: every loss x gate, drift, micro-batching, LoRA,
bad steps, and the final model loading with from_pretrained."""

import json

import pytest
import torch

from opdkit.cli.main import main
from opdkit.config import load_config
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.train.loop import TrainingDiverged, build_update_spec, train
from opdkit.train.telemetry import read_metrics
from opdkit.train.update import run_update


def _cfg(tiny_models, out, *extra):
    student, teacher, data = tiny_models
    return load_config(None, [
        f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
        "data.max_prompt_tokens=64", "data.prompt_template={problem}",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6", "rollout.reward=math", "loss.topk=4", "train.train_steps=1",
        "train.rollout_passes=2", "train.microbatch_size=3", "train.progress=false", "train.save_every_steps=0",
        "optim.lr=1e-3", "train.device=cpu", f"train.output_dir={out}", *extra])


@pytest.mark.parametrize("gate", ["none", "token", "block", "newline", "sequence"])
@pytest.mark.parametrize("loss", ["opd", "lsm", "fkl", "rkl", "jsd"])
def test_every_loss_and_gate_trains_end_to_end(tiny_models, tmp_path, loss, gate):
    cfg = _cfg(tiny_models, tmp_path, f"loss.name={loss}", f"gate.name={gate}", "gate.block_size=2",
               "gate.newline_min_len=1")
    final = train(cfg, print_fn=lambda *a: None)
    updates = read_metrics(tmp_path / "metrics.jsonl", "update")
    assert len(updates) == 2 and all(u["skipped"] == 0 for u in updates)
    # the first update of a rollout batch sees no drift: the gate is exactly 1 (up to recompute noise)
    assert updates[0]["drift_abs_mean"] < 1e-4
    assert updates[0]["gate_min"] > 0.9999 and updates[0]["gate_max"] < 1.0001
    assert all(torch.isfinite(torch.tensor(u["loss"])) for u in updates)
    step = read_metrics(tmp_path / "metrics.jsonl", "step")[0]
    assert {"time/sample", "time/teacher", "time/update", "tokens_per_s", "solve_rate"} <= set(step)
    model = load_model(final)
    before = load_model(tiny_models[0])
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    assert changed, "training did not change the weights"


@pytest.mark.parametrize("extra", [
    ("loss.name=opd_tis", "loss.advantage=recompute", "gate.name=block", "gate.normalize=none",
     "gate.statistic=abs_mean"),
    ("loss.name=opd_tis", "loss.advantage=sign_gated", "gate.name=sequence", "sg.phase_steps=0"),
])
def test_reuse_controls_train_end_to_end(tiny_models, tmp_path, extra):
    cfg = _cfg(tiny_models, tmp_path, "gate.block_size=2", *extra)
    train(cfg, print_fn=lambda *a: None)
    updates = read_metrics(tmp_path / "metrics.jsonl", "update")
    assert len(updates) == 2 and all(u["skipped"] == 0 for u in updates)
    assert updates[0]["gate_min"] > 0.9999  # no drift in the first update: the raw / |δ| gates are 1 too
    assert updates[1]["drift_abs_mean"] > 0 and all(torch.isfinite(torch.tensor(u["loss"])) for u in updates)


def test_cli_train_writes_plan_config_metrics_and_model(tiny_models, tmp_path, capsys):
    student, teacher, data = tiny_models
    rc = main(["train", f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
               "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=5",
               "train.train_steps=2", "train.progress=false", "train.device=cpu", "gate.name=block",
               f"train.output_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "resolved plan" in out and "total optimizer updates" in out
    assert json.loads((tmp_path / "plan.json").read_text())["total_optimizer_updates"] == 4
    assert (tmp_path / "config.yaml").is_file()
    assert len(read_metrics(tmp_path / "metrics.jsonl", "step")) == 2
    tok = load_tokenizer(tmp_path / "final")
    assert tok.eos_token == "<|im_end|>"


def _fixed_batch(tiny_models, cfg):
    student, teacher, _ = tiny_models
    tok = load_tokenizer(student)
    s, t = load_model(student), load_model(teacher)
    prompts = [tok(f"{i}*{i}=")["input_ids"] for i in range(4)]
    batch = sample_rollouts(s, prompts, SamplingParams(max_new_tokens=7, samples_per_prompt=2),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    return tok, score_with_teacher(t, batch, topk=4)


def _drifted_update(tiny_models, batch, spec) -> tuple[list[torch.Tensor], dict]:
    """One run_update on a perturbed copy of the student (so gates differ from 1); returns the gradients
    the optimizer step receives (divided, clipped) and the update's metrics."""
    torch.manual_seed(0)
    model = load_model(tiny_models[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        [p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None]))
    m = run_update(model, opt, sched, batch, spec)
    return seen[0], m


# the reuse controls (§8, opdkit extensions) too: a recomputed advantage, TIS, raw and |δ|-mean gates
@pytest.mark.parametrize("loss, gate, extra", [
    ("opd", "block", ()), ("lsm", "newline", ()), ("jsd", "none", ()),
    ("opd_tis", "block", ("gate.normalize=none", "gate.statistic=abs_mean", "loss.advantage=recompute")),
    ("opd", "sequence", ("loss.advantage=recompute",)), ("opd", "block", ("gate.normalize=sequence",)),
])
def test_update_does_not_depend_on_microbatch_size(tiny_models, tmp_path, loss, gate, extra):
    cfg = _cfg(tiny_models, tmp_path, f"loss.name={loss}", f"gate.name={gate}", "gate.block_size=3",
               "loss.reduction=seq-mean-token-mean", *extra)
    tok, batch = _fixed_batch(tiny_models, cfg)
    grads = []
    for mb in (8, 3, 1):
        spec = build_update_spec(cfg, tok, None)
        spec.microbatch_size = mb
        g, m = _drifted_update(tiny_models, batch, spec)
        assert m["gate_min"] < 0.999 or gate == "none"
        grads.append(g)
    # Tolerance: each gradient element is a float32 sum over the batch's N response tokens, grouped into
    # other micro-batches (other padding widths, other summation order); reordering moves a float32 sum
    # by at most about N * eps32 * max|term|, and the terms are bounded by the largest gradient element.
    n_tokens = float(batch.response_mask_BT.sum())
    g_max = max(float(g.abs().max()) for g in grads[0])
    atol = n_tokens * torch.finfo(torch.float32).eps * g_max
    for other in grads[1:]:
        assert len(other) == len(grads[0])
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=atol, rtol=0.0)


def _assert_grads_close(a_list, b_list, n_tokens):
    """Float32 sums over ``n_tokens`` terms in another order: |error| <= n_tokens · eps32 · max|g|."""
    g_max = max(float(g.abs().max()) for g in a_list)
    atol = n_tokens * torch.finfo(torch.float32).eps * g_max
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        torch.testing.assert_close(a, b, atol=atol, rtol=0.0)


def test_recomputed_advantage_is_teacher_minus_current_student(tiny_models, tmp_path):
    """loss.advantage = recompute (§8, AsyncOPD): the loss reads A = sg(lq − lp_current) of the current
    student; the whole update equals a plain update whose batch carries that advantage precomputed."""
    from opdkit.rollout.scoring import response_logprobs

    cfg = _cfg(tiny_models, tmp_path, "loss.advantage=recompute", "optim.max_grad_norm=0")
    tok, batch = _fixed_batch(tiny_models, cfg)
    spec = build_update_spec(cfg, tok, None)
    seen = []
    fn = spec.loss.fn
    spec.loss = type(spec.loss)(lambda x, hp: seen.append(x.advantage_BT) or fn(x, hp), spec.loss.needs_support,
                                spec.loss.doc, spec.loss.uses_advantage)
    spec.microbatch_size = batch.size
    g_recompute, _ = _drifted_update(tiny_models, batch, spec)
    # the current student of that update (the same perturbation), in float64 for the reference
    torch.manual_seed(0)
    model = load_model(tiny_models[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        lp = response_logprobs(model, batch).logp_BT
    mask = batch.response_mask_BT.bool()
    want = torch.where(mask, batch.teacher_logp_BT.double() - lp.double(), 0.0)
    (got,) = seen
    assert not got.requires_grad
    # both sides are float32 log-probs of the same forward; the difference is rounded once in float32
    tol = 2 * torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0.0)
    plain = torch.where(mask, batch.teacher_logp_BT - batch.logp_old_BT, 0.0).double()
    assert float((got.double() - plain).abs().max()) > 1e-3  # the drift moved it: the test can fail
    # the same update as a plain one whose batch carries lq − lp_current
    cfg_plain = _cfg(tiny_models, tmp_path, "optim.max_grad_norm=0")
    spec_plain = build_update_spec(cfg_plain, tok, None)
    spec_plain.microbatch_size = 3
    pre = batch.select(list(range(batch.size)))
    pre.advantage_BT = want.float()
    g_plain, _ = _drifted_update(tiny_models, pre, spec_plain)
    _assert_grads_close(g_plain, g_recompute, float(batch.response_mask_BT.sum()))


def test_unnormalised_gate_scales_the_batch_gate_update_by_the_mean_gate(tiny_models, tmp_path):
    """gate.normalize = none (§8): token-mean Σ g·l / Σ m, i.e. the batch-normalised Σ g·l / Σ g times
    the mean gate Σ g / Σ m (no gradient clipping, so the gradients compare exactly)."""
    grads, metrics = {}, {}
    for norm in ("batch", "none"):
        cfg = _cfg(tiny_models, tmp_path, "gate.name=block", "gate.block_size=3", f"gate.normalize={norm}",
                   "optim.max_grad_norm=0")
        tok, batch = _fixed_batch(tiny_models, cfg)
        grads[norm], metrics[norm] = _drifted_update(tiny_models, batch, build_update_spec(cfg, tok, None))
    mean_gate = metrics["none"]["gate_raw_mean"]
    assert mean_gate < 0.999  # the gates fired, else none and batch would coincide
    _assert_grads_close([g * mean_gate for g in grads["batch"]], grads["none"],
                        float(batch.response_mask_BT.sum()))


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_models, tmp_path, monkeypatch):
    import opdkit.train.step as step_mod

    real = step_mod.score_with_teacher

    def poisoned(*a, **k):
        b = real(*a, **k)
        b.teacher_logp_BT = torch.full_like(b.teacher_logp_BT, float("nan"))
        return b

    monkeypatch.setattr(step_mod, "score_with_teacher", poisoned)
    cfg = _cfg(tiny_models, tmp_path, "train.train_steps=3", "train.max_bad_updates=3")
    with pytest.raises(TrainingDiverged, match="3 non-finite updates in a row"):
        train(cfg, print_fn=lambda *a: None)
    ups = read_metrics(tmp_path / "metrics.jsonl", "update")
    assert [u["skipped"] for u in ups] == [1.0, 1.0, 1.0]


def test_lora_run_saves_a_merged_model(tiny_models, tmp_path):
    cfg = _cfg(tiny_models, tmp_path, "model.lora_r=4", "model.lora_target_modules=[q_proj, v_proj]")
    final = train(cfg, print_fn=lambda *a: None)
    model = load_model(final)
    assert not any("lora" in n for n in model.state_dict())
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
