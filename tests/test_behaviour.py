"""Behaviour log-probs recomputed with the training forward: the first update's drift is exactly 0 even
when the sampler's log-probs disagree with the training forward (train.behaviour_logprobs)."""

import pytest
import torch

from opdkit.config import ConfigError, load_config
from opdkit.train import step as step_mod
from opdkit.train.behaviour import resolve_behaviour_logprobs
from opdkit.train.loop import train
from opdkit.train.telemetry import read_metrics

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
