"""opdkit's losses registered with verl's distillation-loss registry (``loss_mode=opdkit_*``).

Each registered function has verl's signature ``fn(config, distillation_config, model_output, data) ->
(loss_BT, metrics)``; ``data`` is one micro-batch, nested (no padding) or padded. It converts verl's
tensors to opdkit's response-aligned ``[B,T]`` layout, calls :mod:`opdkit.losses` / :mod:`opdkit.gates`
(no math here), and returns ``w_t · l_t · m_eff,t``: verl's ``agg_loss`` (token-mean) then divides by
``batch_num_tokens``, and the engine hook (:mod:`.denominator`) turns that divisor into opdkit's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

from opdkit.gates.drift import drift_gate, normalize_gate
from opdkit.gates.registry import get_segmenter
from opdkit.gates.sign import sign_agreement, sign_consistency_advantage
from opdkit.integrations.verl.denominator import ACCUMULATOR
from opdkit.integrations.verl.guards import VerlIntegrationError, check_actor_setting, check_exact_denominator
from opdkit.integrations.verl.telemetry import gate_metrics
from opdkit.losses.masking import special_token_mask
from opdkit.losses.opd import clip_fraction, opd_advantage, sampled_token_opd

HOOK_KEY = "opdkit_exact_denominator"  # non-tensor flag the opdkit engine sets on every mini-batch
LOSS_MODES = ("opdkit_opd", "opdkit_lsm", "opdkit_sg_opd")


@dataclass
class Micro:
    """One verl micro-batch in opdkit's layout: response-aligned ``[B,T]`` (position 0 = first response token)."""

    logp_BT: torch.Tensor  # current student log-prob of the sampled token (carries the gradient)
    logp_old_BT: torch.Tensor  # behaviour student, recorded at rollout
    mask_BT: torch.Tensor  # bool: response mask after special-token masking (§2.4)
    response_ids_BT: torch.Tensor


def _padded(x: torch.Tensor, T: int, fill) -> torch.Tensor:
    """A nested or padded ``[B,T',...]`` tensor as padded ``[B,T,...]`` (pad or cut on dim 1)."""
    x = x.to_padded_tensor(fill) if x.is_nested else x
    if x.shape[1] < T:
        pad = (0, 0) * (x.dim() - 2) + (0, T - x.shape[1])
        x = F.pad(x, pad, value=fill)
    return x[:, :T]


def loss_config(distillation_config):
    """``distillation.distillation_loss``, checked to be opdkit's config (it carries the gate settings)."""
    lcfg = distillation_config.distillation_loss
    if not hasattr(lcfg, "gate_scope"):
        raise VerlIntegrationError(
            f"loss_mode={lcfg.loss_mode} needs opdkit's loss config: set distillation.distillation_loss._target_="
            "opdkit.integrations.verl.config.OpdkitDistillationLossConfig (opdkit/configs/verl/opdkit_base.yaml does)")
    return lcfg


def micro_from_verl(model_output: dict, data, special_token_ids) -> Micro:
    """Convert verl's model output and micro-batch to :class:`Micro` (verl's own padding helper)."""
    if model_output.get("log_probs") is None:
        raise KeyError("model_output has no 'log_probs' (verl skips them when distillation_only): run with the "
                       "opdkit engine hook (VERL_ENGINE_VENDOR=opdkit), which keeps them for the drift gate")
    rm = data["response_mask"]
    resp_mask_BT = (rm.to_padded_tensor(0) if rm.is_nested else rm).bool()
    T = resp_mask_BT.shape[1]  # verl's agg_loss pads the mask exactly so; every [B,T] here follows it
    logp_BT = _padded(no_padding_2_padding(model_output["log_probs"], data), T, 0.0)
    response_ids_BT = _padded(data["responses"], T, 0)
    mask_BT = special_token_mask(response_ids_BT, resp_mask_BT, list(special_token_ids)) if special_token_ids \
        else resp_mask_BT
    return Micro(logp_BT, _padded(data["old_log_probs"], T, 0.0), mask_BT, response_ids_BT)


def teacher_logp(data, T: int) -> torch.Tensor:
    """Teacher log-prob of the sampled token ``[B,T]`` (verl's estimator path: ``teacher_logprobs[..., 1]``)."""
    lq = no_padding_2_padding(data["teacher_logprobs"], data)
    if lq.dim() == 3:
        if lq.shape[-1] != 1:
            raise ValueError(f"opdkit_opd needs the teacher log-prob of the sampled token (topk=1 estimator "
                             f"path), got teacher_logprobs with last dim {lq.shape[-1]}")
        lq = lq.squeeze(-1)
    return _padded(lq, T, 0.0)


def drift_weights(m: Micro, lcfg) -> torch.Tensor | None:
    """Drift gate ``g`` (§4 steps 1-4), per-sequence normalised when ``gate_scope=sequence``; None: no gate."""
    segmenter = get_segmenter(lcfg.gate)
    if segmenter is None:
        return None
    seg_BT = segmenter(m.response_ids_BT, m.mask_BT, lcfg.segment_params)
    g_BT = drift_gate(m.logp_BT, m.logp_old_BT, m.mask_BT, seg_BT, tau=lcfg.tau)
    return normalize_gate(g_BT, m.mask_BT, scope="sequence") if lcfg.gate_scope == "sequence" else g_BT


def finish(config, lcfg, m: Micro, loss_BT: torch.Tensor, w_BT: torch.Tensor | None, data,
           metrics: dict) -> tuple[torch.Tensor, dict]:
    """Weight, record the micro-batch denominator ``d_mb`` for the exact reduction, add telemetry."""
    check_actor_setting(config.strategy, config.loss_agg_mode)
    batch_gate = w_BT is not None and lcfg.gate_scope == "batch"
    needs_hook = batch_gate or bool(lcfg.special_token_ids) or lcfg.loss_mode == "opdkit_lsm"
    hook = bool(tu.get_non_tensor_data(data=data, key=HOOK_KEY, default=False))
    check_exact_denominator(needs_hook, hook, f"loss_mode={lcfg.loss_mode}, gate={lcfg.gate}, "
                            f"gate_scope={lcfg.gate_scope}, special_token_ids={list(lcfg.special_token_ids)}")
    mask_f = m.mask_BT.to(torch.float32)
    if hook:
        ACCUMULATOR.add(mask_f.sum(), (w_BT.detach() * mask_f).sum() if batch_gate else None)
    if w_BT is not None:
        loss_BT = loss_BT * w_BT.detach().to(loss_BT.dtype)
    metrics.update(gate_metrics(m.logp_BT, m.logp_old_BT, m.mask_BT, w_BT))
    return torch.where(m.mask_BT, loss_BT, torch.zeros((), dtype=loss_BT.dtype, device=loss_BT.device)), metrics


@register_distillation_loss(DistillationLossSettings(names=["opdkit_opd"], use_estimator=True))
def opdkit_opd(config, distillation_config, model_output, data):
    """Sampled-token OPD (§2.1) with the drift gate (§4) and special-token mask (§2.4); per-token ``[B,T]``."""
    lcfg = loss_config(distillation_config)
    m = micro_from_verl(model_output, data, lcfg.special_token_ids)
    lq_BT = teacher_logp(data, m.logp_BT.shape[1])
    loss_BT = sampled_token_opd(m.logp_BT, m.logp_old_BT, lq_BT, m.mask_BT, clip_eps=lcfg.clip_ratio,
                                dual_clip=lcfg.dual_clip)
    a_BT = opd_advantage(lq_BT, m.logp_old_BT, m.mask_BT)
    clip = clip_fraction(m.logp_BT, m.logp_old_BT, a_BT, m.mask_BT, clip_eps=lcfg.clip_ratio)
    metrics = {"opdkit/clip_frac": (clip * m.mask_BT).sum().item() / max(int(m.mask_BT.sum()), 1)}
    return finish(config, lcfg, m, loss_BT, drift_weights(m, lcfg), data, metrics)


def rollout_rewards(data, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifier reward ``R_B`` (sum of the token-level scores) and ``A^V_B`` (verl's GRPO advantage, first token).

    The scores are ``rm_scores`` (verl's v1 trainer keeps them in the update batch) or ``token_level_scores``
    (the legacy trainer). With ``algorithm.adv_estimator=grpo`` and ``norm_adv_by_std_in_grpo=false`` verl's
    advantage is ``R_i − mean_group(R)`` broadcast over the response: exactly SG-OPD's ``A^V_i`` (§5.1),
    computed by verl over whole prompt groups before the mini-batch is split into micro-batches.
    """
    keys = set(data.keys())
    score_key = next((k for k in ("rm_scores", "token_level_scores") if k in keys), None)
    if score_key is None or "advantages" not in keys:
        raise VerlIntegrationError(
            "opdkit_sg_opd needs the verifier reward in the update batch (rm_scores or token_level_scores, and "
            "advantages): set reward.custom_reward_function.path=pkg://opdkit.integrations.verl.reward, "
            "algorithm.adv_estimator=grpo and algorithm.norm_adv_by_std_in_grpo=false "
            "(opdkit/configs/verl/sg_opd.yaml)")
    scores_BT = _padded(data[score_key], T, 0.0)
    adv_BT = _padded(data["advantages"], T, 0.0)
    return scores_BT.sum(dim=1), adv_BT[:, 0]


@register_distillation_loss(DistillationLossSettings(names=["opdkit_sg_opd"], use_estimator=True))
def opdkit_sg_opd(config, distillation_config, model_output, data):
    """SG-OPD (§5.1): the OPD surrogate with the sign-consistency advantage ``A'``, plus the drift gate."""
    lcfg = loss_config(distillation_config)
    m = micro_from_verl(model_output, data, lcfg.special_token_ids)
    T = m.logp_BT.shape[1]
    lq_BT = teacher_logp(data, T)
    reward_B, av_B = rollout_rewards(data, T)
    a_BT = opd_advantage(lq_BT, m.logp_old_BT, m.mask_BT)
    a2_BT = sign_consistency_advantage(a_BT, reward_B, None, m.mask_BT, lam=lcfg.sg_lambda, beta=lcfg.sg_beta,
                                       verifier_advantage_B=av_B)
    loss_BT = sampled_token_opd(m.logp_BT, m.logp_old_BT, None, m.mask_BT, clip_eps=lcfg.clip_ratio,
                                dual_clip=lcfg.dual_clip, advantage_BT=a2_BT)
    agree = sign_agreement(a_BT, reward_B, m.mask_BT)
    metrics = {"opdkit/sign_agreement": agree.sum().item() / max(int(m.mask_BT.sum()), 1)}
    return finish(config, lcfg, m, loss_BT, drift_weights(m, lcfg), data, metrics)


@register_distillation_loss(DistillationLossSettings(names=["opdkit_lsm"], use_topk=True))
def opdkit_lsm(config, distillation_config, model_output, data):
    """LSM (§2.2) with the drift gate: per-token LSM comes from opdkit's logits processor (:mod:`.logits`)."""
    lcfg = loss_config(distillation_config)
    if "opdkit_lsm" not in model_output:
        raise KeyError("model_output has no 'opdkit_lsm': the LSM logits processor did not run; it is installed "
                       "by the opdkit engine hook (VERL_ENGINE_VENDOR=opdkit)")
    m = micro_from_verl(model_output, data, lcfg.special_token_ids)
    loss_BT = _padded(no_padding_2_padding(model_output["opdkit_lsm"], data), m.logp_BT.shape[1], 0.0)
    return finish(config, lcfg, m, loss_BT, drift_weights(m, lcfg), data, {})
