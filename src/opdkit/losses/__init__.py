"""Pure loss math (torch only): per-position OPD losses, reduction, chunked log-probs, registry."""

from opdkit.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
)
from opdkit.losses.logprobs import LogprobOutput, fused_logprobs, logprobs_from_logits
from opdkit.losses.lsm import topk_support_matching
from opdkit.losses.masking import special_token_mask
from opdkit.losses.opd import clip_fraction, opd_advantage, sampled_token_opd
from opdkit.losses.reduction import (
    REDUCTION_MODES,
    loss_denominator,
    loss_numerator,
    reduce_loss,
    reduction_stats,
)
from opdkit.losses.registry import BASE_LOSSES, LossHParams, LossInputs, get_loss
from opdkit.losses.tis import tis_weight, truncated_is_opd

__all__ = [
    "BASE_LOSSES", "REDUCTION_MODES", "LogprobOutput", "LossHParams", "LossInputs", "clip_fraction",
    "forward_kl", "fused_logprobs", "generalized_jsd", "get_loss", "logprobs_from_logits", "loss_denominator",
    "loss_numerator", "opd_advantage", "reduce_loss", "reduction_stats", "reverse_kl", "sampled_token_opd",
    "special_token_mask", "tis_weight", "topk_forward_kl", "topk_generalized_jsd", "topk_reverse_kl",
    "topk_support_matching", "truncated_is_opd",
]
