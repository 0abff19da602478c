"""opdkit's registered losses run through verl 0.9.1's own ``distillation_ppo_loss`` / ``agg_loss`` equal
opdkit's ``reduce_loss(loss, weights=drift_gate(...))``: loss value and gradient, nested and padded
micro-batches, micro-batch splits 1/2/4, and two simulated data-parallel ranks.

Tolerance: both sides compute in float32 from the same logits; they differ only in summation order
(packed vs padded sums, per-micro-batch partial sums, verl's ``/ batch_num_tokens · dp_size`` then the
hook's ``· batch_num_tokens / D``). Each is a sum of < 100 terms of size O(1), so the relative rounding
difference is below ~100 · 2^-24 ≈ 6e-6; we allow rtol 2e-5 (and atol 1e-6 for entries near 0).
"""

from __future__ import annotations

import functools

import pytest

# not importorskip("verl"): with tests/ on sys.path this folder itself imports as a namespace package "verl"
pytest.importorskip("verl.trainer.distillation.losses", reason="verl lane only (.ci/run stage verl)")

import torch  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.workers.config import DistillationConfig, FSDPActorConfig  # noqa: E402
from verl_batches import (  # noqa: E402
    NEWLINE_ID,
    SPECIAL_ID,
    make_batch,
    micro_batch,
    model_output,
    packed_logits,
    student_logp_BR,
    student_support_logits_BRK,
)

from opdkit.gates import SEGMENTERS, SegmentParams, drift_gate, normalize_gate, sign_consistency_advantage  # noqa: E402
from opdkit.integrations.verl import OpdkitDistillationLossConfig  # noqa: E402
from opdkit.integrations.verl.denominator import ACCUMULATOR, finish_mini_batch  # noqa: E402
from opdkit.integrations.verl.guards import VerlIntegrationError  # noqa: E402
from opdkit.integrations.verl.logits import with_opdkit_logits  # noqa: E402
from opdkit.losses import opd_advantage, reduce_loss, sampled_token_opd, special_token_mask  # noqa: E402
from opdkit.losses.lsm import topk_support_matching  # noqa: E402

RTOL, ATOL = 2e-5, 1e-6
BLOCK = 3  # short responses: Block-3 gives several blocks per row (the paper's 64 is a config value)


def loss_config(mode, gate, scope, special):
    return OpdkitDistillationLossConfig(
        loss_mode=f"opdkit_{mode}", topk=4, gate=gate, gate_scope=scope, block_size=BLOCK,
        newline_token_ids=[NEWLINE_ID], newline_min_len=2, newline_max_len=4, newline_fallback=BLOCK,
        special_token_ids=[SPECIAL_ID] if special else [])


def reference(b, mode, gate, scope, special):
    """opdkit's own update: reduce_loss(base loss, weights=drift_gate(...)) over the whole batch."""
    lp = student_logp_BR(b)
    mask = special_token_mask(b.responses_BR, b.mask_BR, [SPECIAL_ID]) if special else b.mask_BR
    if mode == "opd":
        loss_BT = sampled_token_opd(lp, b.lp_old_BR, b.lq_BR, mask, clip_eps=0.2, dual_clip=3.0)
    elif mode == "sg_opd":
        a = opd_advantage(b.lq_BR, b.lp_old_BR, mask)
        a2 = sign_consistency_advantage(a, b.reward_B, torch.arange(len(b.reward_B)) // 4, mask)
        loss_BT = sampled_token_opd(lp, b.lp_old_BR, None, mask, clip_eps=0.2, dual_clip=3.0, advantage_BT=a2)
    else:
        loss_BT = topk_support_matching(student_support_logits_BRK(b), b.teacher_topk_logp_BRK, mask)
    w = None
    if gate != "none":
        params = SegmentParams(block_size=BLOCK, newline_token_ids=(NEWLINE_ID,), newline_min_len=2,
                               newline_max_len=4, newline_fallback=BLOCK)
        seg = SEGMENTERS[gate](b.responses_BR, mask, params)
        w = drift_gate(lp, b.lp_old_BR, mask, seg)
        if scope == "sequence":
            w = normalize_gate(w, mask, scope="sequence")
    loss = reduce_loss(loss_BT, mask, weights_BT=w, normalize_weights=scope == "batch")
    (grad,) = torch.autograd.grad(loss, b.Z)
    return loss.detach(), grad


def through_verl(b, lcfg, ranks, *, nested, hook=True, return_stats=False):
    """verl's loss path: per rank, per micro-batch ``distillation_ppo_loss`` + backward; then the FSDP mean
    over ranks and the opdkit engine hook's rescale (an all-reduce simulated by summing the ranks' sums)."""
    actor = FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    dcfg = DistillationConfig(enabled=False, distillation_loss=lcfg)
    loss_fn = with_opdkit_logits(functools.partial(distillation_ppo_loss, config=actor, distillation_config=dcfg))
    n_tokens = int(b.td["response_mask"].sum())
    b.Z.grad = None
    totals, loss_sum = [], 0.0
    for micro_rows in ranks:
        ACCUMULATOR.reset()
        for rows in micro_rows:
            td = micro_batch(b, rows, nested=nested, batch_num_tokens=n_tokens, dp_size=len(ranks), hook=hook)
            out = model_output(b, rows, td)
            if lcfg.loss_settings.use_topk:  # the engine's logits-processor call, then its nesting
                for k, v in loss_fn(student_logits=packed_logits(b, rows)[None], data=td).items():
                    out[k] = torch.nested.nested_tensor_from_jagged(v.squeeze(0), td["input_ids"].offsets())
            loss, _ = loss_fn(model_output=out, data=td, dp_group=None)
            loss.backward()
            loss_sum += float(loss.detach())
        totals.append(ACCUMULATOR.total())
    b.Z.grad /= len(ranks)  # FSDP / DDP average gradients over data-parallel ranks
    others = sum(totals[:-1], torch.zeros(2, dtype=torch.float64))
    stats = finish_mini_batch([b.Z], n_tokens, all_reduce=lambda t: t.add_(others)) if hook else {}
    if return_stats:
        return stats
    factor = stats.get("grad_scale", 1.0)
    return torch.tensor(loss_sum / len(ranks) * factor), b.Z.grad.clone()


SPLITS = {
    "1x1": [[list(range(8))]],
    "1x2": [[[0, 1, 2, 3], [4, 5, 6, 7]]],
    "1x4": [[[0, 1], [2, 3], [4, 5], [6, 7]]],
    "2x1": [[[0, 1, 2, 3]], [[4, 5, 6, 7]]],
    "2x2": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]],
}
GATES = [("none", "batch"), ("token", "batch"), ("block", "batch"), ("block", "sequence"), ("newline", "batch"),
         ("sequence", "batch")]


def check(mode, gate, scope, special, split, nested, seed=0):
    b = make_batch(topk=mode == "lsm", seed=seed)
    ref_loss, ref_grad = reference(b, mode, gate, scope, special)
    loss, grad = through_verl(b, loss_config(mode, gate, scope, special), SPLITS[split], nested=nested)
    assert ref_grad.abs().max() > 1e-3  # the comparison is not between two zero gradients
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("gate,scope", GATES)
@pytest.mark.parametrize("nested", [False, True], ids=["padded", "nested"])
def test_opd_equals_opdkit_reduce_loss(gate, scope, split, nested):
    check("opd", gate, scope, special=True, split=split, nested=nested)


@pytest.mark.parametrize("split", ["1x1", "1x4", "2x2"])
@pytest.mark.parametrize("gate,scope", [("none", "batch"), ("block", "batch"), ("newline", "sequence")])
@pytest.mark.parametrize("nested", [False, True], ids=["padded", "nested"])
def test_lsm_equals_opdkit_reduce_loss(gate, scope, split, nested):
    check("lsm", gate, scope, special=True, split=split, nested=nested)


@pytest.mark.parametrize("split", ["1x1", "1x2", "2x2"])
@pytest.mark.parametrize("gate,scope", [("none", "batch"), ("block", "batch")])
def test_sg_opd_equals_opdkit_reduce_loss(gate, scope, split):
    """verl's GRPO advantage (R − group mean, computed before the split) is SG-OPD's A^V (§5.1)."""
    check("sg_opd", gate, scope, special=False, split=split, nested=True)


@pytest.mark.parametrize("split", ["1x2", "2x2"])
def test_stock_engine_exact_for_sequence_scope(split):
    """Without the hook (verl's stock engine) the per-sequence gate without special tokens is exact as is."""
    b = make_batch(seed=1)
    ref_loss, ref_grad = reference(b, "opd", "block", "sequence", special=False)
    loss, grad = through_verl(b, loss_config("opd", "block", "sequence", False), SPLITS[split], nested=False,
                              hook=False)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("gate,scope,special", [("block", "batch", False), ("block", "sequence", True)])
def test_stock_engine_refuses_what_needs_the_hook(gate, scope, special):
    b = make_batch(seed=2)
    with pytest.raises(VerlIntegrationError, match="VERL_ENGINE_VENDOR=opdkit"):
        through_verl(b, loss_config("opd", gate, scope, special), SPLITS["1x1"], nested=False, hook=False)


def test_gate_is_one_without_drift():
    """At π_θ = π_old every gate is exactly 1 (§4), so Block-n OPD equals plain OPD through verl."""
    b = make_batch(seed=3)
    with torch.no_grad():
        b.td["old_log_probs"] = torch.where(b.mask_BR, student_logp_BR(b), 0.0)
    b.lp_old_BR = b.td["old_log_probs"]
    plain_loss, plain_grad = through_verl(b, loss_config("opd", "none", "batch", True), SPLITS["1x2"], nested=True)
    gated_loss, gated_grad = through_verl(b, loss_config("opd", "block", "batch", True), SPLITS["1x2"], nested=True)
    torch.testing.assert_close(gated_loss, plain_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gated_grad, plain_grad, rtol=RTOL, atol=ATOL)
