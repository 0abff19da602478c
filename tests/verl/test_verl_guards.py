"""Guards (unsupported verl version / setting raise, naming the fix) and gate telemetry of the verl plugin."""

from __future__ import annotations

import pytest

# not importorskip("verl"): with tests/ on sys.path this folder itself imports as a namespace package "verl"
pytest.importorskip("verl.trainer.distillation.losses", reason="verl lane only (.ci/run stage verl)")

import torch  # noqa: E402
from test_verl_losses import BLOCK, SPLITS, loss_config, through_verl  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.config import DistillationConfig, DistillationLossConfig, FSDPActorConfig  # noqa: E402
from verl_batches import make_batch, micro_batch, model_output, student_logp_BR  # noqa: E402

from opdkit.gates import SEGMENTERS, SegmentParams, drift_gate  # noqa: E402
from opdkit.integrations.verl import OpdkitDistillationLossConfig  # noqa: E402
from opdkit.integrations.verl.denominator import ACCUMULATOR, finish_mini_batch  # noqa: E402
from opdkit.integrations.verl.guards import VerlIntegrationError, check_verl_version  # noqa: E402


def test_version_guard():
    check_verl_version("0.9.1")
    for v in ("0.9.0", "0.10.0", "0.9.1.dev0"):
        with pytest.raises(VerlIntegrationError, match=r"pip install \"opdkit\[verl\]\""):
            check_verl_version(v)


@pytest.mark.parametrize("kwargs,match", [
    ({"use_policy_gradient": True}, "use_policy_gradient=false"),
    ({"use_task_rewards": True}, "use_task_rewards=false"),
    ({"loss_max_clamp": 10.0}, "loss_max_clamp=null"),
    ({"log_prob_min_clamp": -10.0}, "log_prob_min_clamp=null"),
    ({"clip_ratio_high": 0.28}, "symmetric"),
    ({"dual_clip": 1.0}, "dual_clip must be > 1"),
    ({"gate": "blocks"}, "valid: "),
    ({"gate_scope": "global"}, "valid: batch, sequence, none"),
    ({"gate": "newline"}, "tokenizer=PATH"),
    ({"special_tokens": ["<|im_end|>"]}, "tokenizer=PATH"),
    ({"loss_mode": "opdkit_lsm", "topk": None}, "topk > 0"),
    ({"loss_mode": "k3"}, "not an opdkit loss"),
])
def test_loss_config_refuses_unsupported_settings(kwargs, match):
    with pytest.raises(VerlIntegrationError, match=match):
        OpdkitDistillationLossConfig(**kwargs)


def _run_one(lcfg, actor=None, b=None, drop=()):
    b = b or make_batch(seed=4)
    actor = actor or FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=1,
                                     rollout_n=1)
    dcfg = DistillationConfig(enabled=False, distillation_loss=lcfg)
    td = micro_batch(b, list(range(8)), nested=True, batch_num_tokens=int(b.td["response_mask"].sum()), dp_size=1,
                     hook=True)
    for k in drop:
        del td[k]
    return distillation_ppo_loss(actor, dcfg, model_output=model_output(b, list(range(8)), td), data=td)


def test_verl_loss_config_with_opdkit_loss_mode_is_refused():
    lcfg = DistillationLossConfig(loss_mode="opdkit_opd", use_task_rewards=False, use_policy_gradient=False)
    with pytest.raises(VerlIntegrationError, match="_target_=opdkit.integrations.verl.config"):
        _run_one(lcfg)


@pytest.mark.parametrize("setting", [{"loss_agg_mode": "seq-mean-token-mean"}, {"loss_agg_mode": "token-sum"}])
def test_actor_aggregation_other_than_token_mean_is_refused(setting):
    actor = FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                            **setting)
    with pytest.raises(VerlIntegrationError, match="loss_agg_mode=token-mean"):
        _run_one(loss_config("opd", "block", "batch", False), actor=actor)


def test_sg_opd_without_verifier_reward_is_refused():
    with pytest.raises(VerlIntegrationError, match="custom_reward_function"):
        _run_one(loss_config("sg_opd", "none", "batch", False), drop=("token_level_scores",))


def test_hook_leaves_other_losses_alone():
    """A mini-batch no opdkit loss saw (verl's own loss under the opdkit engine) keeps its gradient (factor 1)."""
    ACCUMULATOR.reset()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert finish_mini_batch([p], 10.0) == {}
    assert torch.equal(p.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("split", ["1x1", "2x2"])
def test_gate_telemetry(split):
    """Per-micro-batch gate metrics are verl Metrics; the hook's gate mean is exact over the mini-batch."""
    b = make_batch(seed=5)
    lcfg = loss_config("opd", "block", "batch", False)
    _, metrics = _run_one(lcfg, b=b)
    for k in ("opdkit/gate_mean", "opdkit/gate_std", "opdkit/gate_min", "opdkit/gate_max", "opdkit/abs_drift"):
        assert isinstance(metrics[k], Metric), k
    lp = student_logp_BR(b)
    params = SegmentParams(block_size=BLOCK)
    g = drift_gate(lp, b.lp_old_BR, b.mask_BR, SEGMENTERS["block"](b.responses_BR, b.mask_BR, params))
    m = b.mask_BR
    assert float(metrics["opdkit/gate_min"].aggregate()) == pytest.approx(float(g[m].min()), rel=1e-6)
    assert float(metrics["opdkit/gate_max"].aggregate()) == pytest.approx(float(g[m].max()), rel=1e-6)
    stats = through_verl(b, lcfg, SPLITS[split], nested=True, return_stats=True)
    ref_mean = float((g * m).sum() / m.sum())
    assert stats["gate_mean"] == pytest.approx(ref_mean, rel=1e-6)
    assert stats["tokens"] == float(m.sum())
    assert stats["grad_scale"] == pytest.approx(float(m.sum()) / float((g * m).sum()), rel=1e-6)


def test_token_ids_come_from_the_tokenizer(tmp_path):
    """special_tokens and NewlineSpan's newline ids are read from the tokenizer folder (as opdkit's trainer does)."""
    from opdkit.tokenizer import char_tokenizer

    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    cfg = OpdkitDistillationLossConfig(gate="newline", special_tokens=["<|im_end|>", "<"], tokenizer=str(tmp_path))
    assert cfg.newline_token_ids == [tok.convert_tokens_to_ids("\n")]
    assert cfg.special_token_ids == sorted([tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<")])
    with pytest.raises(VerlIntegrationError, match="not a single token"):
        OpdkitDistillationLossConfig(special_tokens=["think"], tokenizer=str(tmp_path))


def _antlr_version() -> str:
    from importlib.metadata import version

    return version("antlr4-python3-runtime")


@pytest.mark.xfail(condition=_antlr_version().startswith("4.9."), strict=True,
                   reason="latex2sympy2_extended 1.11.0's ANTLR 4.9.3 parser has no FUNC_GAMMA on atoms, so a percent "
                          "answer does not parse; hydra-core pins antlr4 4.9.* in the verl lane")
def test_percent_answer_grades_in_this_lane():
    """Known verl-lane defect, kept visible: when upstream fixes it this strict xfail fails, and the two
    deselected test_verify cases in .ci/run's verl-fast stage can come back."""
    from opdkit.verify import grade

    assert grade("so \\boxed{50\\%}", "50").reward == 1
