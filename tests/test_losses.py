"""Tests of the base losses (docs/methods.md §2.1-2.4).

Every loss is compared against an independent float64 reference written position by position with
plain Python loops over 0-d float64 tensors (so torch.autograd gives reference gradients too).
"""

from __future__ import annotations

import math

import pytest
import torch

from opdkit.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
)
from opdkit.losses.lsm import topk_support_matching
from opdkit.losses.masking import special_token_mask
from opdkit.losses.opd import clip_fraction, opd_advantage, sampled_token_opd
from opdkit.losses.registry import BASE_LOSSES, LossHParams, LossInputs
from opdkit.losses.tis import tis_weight, truncated_is_opd

B, T, V, K = 3, 7, 11, 5
F64 = torch.float64


def make_mask() -> torch.Tensor:
    """Row 0 full, row 1 padded at the end and masked in the middle, row 2 fully padded."""
    mask_BT = torch.ones(B, T)
    mask_BT[1, 5:] = 0
    mask_BT[1, 2] = 0
    mask_BT[2, :] = 0
    return mask_BT


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ float64 references (plain loops)
def ref_log_softmax(z: list[torch.Tensor]) -> list[torch.Tensor]:
    shift = max(float(v.detach()) for v in z)
    lse = shift + torch.log(sum(torch.exp(v - shift) for v in z))
    return [v - lse for v in z]


def ref_kl(la: list[torch.Tensor], lb: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=F64)
    for a, b in zip(la, lb, strict=True):
        if float(a.detach()) > -math.inf:
            total = total + torch.exp(a) * (a - b)
    return total


def ref_jsd(lp: list[torch.Tensor], lq: list[torch.Tensor], beta: float) -> torch.Tensor:
    if beta == 0:
        return ref_kl(lq, lp)
    if beta == 1:
        return ref_kl(lp, lq)
    lm = [torch.log(beta * torch.exp(q) + (1 - beta) * torch.exp(p)) for p, q in zip(lp, lq, strict=True)]
    return beta * ref_kl(lq, lm) + (1 - beta) * ref_kl(lp, lm)


def ref_support(logp: list[torch.Tensor], tail: bool) -> list[torch.Tensor]:
    probs = [torch.exp(v) for v in logp]
    total = sum(probs)
    if tail:
        return list(logp) + [torch.log(1 - total)]
    return [torch.log(p / total) for p in probs]


def ref_per_position(fn, mask_BT: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(list-of-rows...) -> 0-d`` at each valid position; 0 at masked ones."""
    rows = []
    for b in range(mask_BT.shape[0]):
        row = []
        for t in range(mask_BT.shape[1]):
            if mask_BT[b, t] == 0:
                row.append(torch.zeros((), dtype=F64))
            else:
                args = [x[b, t] if x.dim() == 2 else list(x[b, t].unbind(-1)) for x in tensors]
                row.append(fn(*args) * float(mask_BT[b, t]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_opd(lp, lp_old, lq, eps=0.2, c=3.0, adv=None) -> torch.Tensor:
    """Branch form of §2.1: A>=0: -A min(r, 1+eps); A<0: min(|A| max(r, 1-eps), c|A|)."""
    a = float(lq - lp_old) if adv is None else float(adv)
    r = torch.exp(lp - lp_old.detach())
    if a >= 0:
        return -a * r if float(r.detach()) <= 1 + eps else torch.tensor(-a * (1 + eps), dtype=F64)
    val = -a * r if float(r.detach()) >= 1 - eps else torch.tensor(-a * (1 - eps), dtype=F64)
    if c is not None and float(val.detach()) > -c * a:
        return torch.tensor(-c * a, dtype=F64)
    return val


def opd_inputs(seed: int, dtype=torch.float32):
    g = gen(seed)
    logp_old_BT = torch.log(torch.rand(B, T, generator=g, dtype=F64) * 0.9 + 0.05)
    logp_BT = logp_old_BT + 0.6 * torch.randn(B, T, generator=g, dtype=F64)  # spans all clip branches
    logp_teacher_BT = logp_old_BT + 1.5 * torch.randn(B, T, generator=g, dtype=F64)
    # row 0 pins one (A, r) pair per branch of §2.1 so every branch is exercised
    pairs = [(0.7, 1.5), (0.4, 0.6), (0.3, 1.1), (-0.6, 0.5), (-0.3, 1.3), (-0.5, 5.0), (-0.2, 2.0)]
    for t, (adv, ratio) in enumerate(pairs):
        logp_BT[0, t] = logp_old_BT[0, t] + math.log(ratio)
        logp_teacher_BT[0, t] = logp_old_BT[0, t] + adv
    return logp_BT.to(dtype), logp_old_BT.to(dtype), logp_teacher_BT.to(dtype)


# ------------------------------------------------------------------ §2.1 sampled-token OPD
@pytest.mark.parametrize("dual_clip", [3.0, 1.5, None])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opd_matches_reference_and_gradient(dual_clip, dtype):
    mask_BT = make_mask()
    lp, lp_old, lq = opd_inputs(0, dtype)
    lp = lp.requires_grad_()
    loss_BT = sampled_token_opd(lp, lp_old, lq, mask_BT, clip_eps=0.2, dual_clip=dual_clip)
    assert loss_BT.shape == (B, T) and loss_BT.dtype == dtype
    loss_BT.sum().backward()

    lp64 = lp.detach().to(F64).requires_grad_()
    ref_BT = ref_per_position(
        lambda a, b_, c_: ref_opd(a, b_, c_, 0.2, dual_clip), mask_BT, lp64, lp_old.to(F64), lq.to(F64)
    )
    ref_BT.sum().backward()
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(loss_BT.detach().to(F64), ref_BT.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(lp.grad.to(F64), lp64.grad, atol=tol, rtol=tol)
    # the inputs exercise every branch, else this test could not fail on one of them
    adv = (lq - lp_old).to(F64)
    r = torch.exp((lp.detach() - lp_old).to(F64))
    valid = mask_BT.bool()
    assert (valid & (adv > 0) & (r > 1.2)).any() and (valid & (adv > 0) & (r < 1.2)).any()
    assert (valid & (adv < 0) & (r < 0.8)).any() and (valid & (adv < 0) & (r > 0.8) & (r < 1.5)).any()
    assert (valid & (adv < 0) & (r > 3.0)).any()


@pytest.mark.parametrize(
    "adv, ratio, expected, grad, dual_clip",
    [
        (0.5, 1.1, -0.55, -0.55, 3.0),  # A>0 unclipped: -A r, d/dlp = -A r
        (0.5, 0.5, -0.25, -0.25, 3.0),  # A>0, r<1-eps: unclipped branch wins
        (0.5, 1.5, -0.6, 0.0, 3.0),  # A>0 clipped at 1+eps
        (-0.5, 1.5, 0.75, 0.75, 3.0),  # A<0 unclipped
        (-0.5, 0.5, 0.4, 0.0, 3.0),  # A<0 clipped at 1-eps
        (-0.5, 4.0, 1.5, 0.0, 3.0),  # A<0 dual clip active: min(2.0, 3*0.5)
        (-0.5, 4.0, 2.0, 2.0, None),  # dual clip disabled
        (0.0, 4.0, 0.0, 0.0, 3.0),  # zero advantage
    ],
)
def test_opd_hand_cases(adv, ratio, expected, grad, dual_clip):
    lp_old = torch.tensor([[-1.0]], dtype=F64)
    lp = (lp_old + math.log(ratio)).requires_grad_()
    lq = lp_old + adv
    loss = sampled_token_opd(lp, lp_old, lq, torch.ones(1, 1), clip_eps=0.2, dual_clip=dual_clip)
    loss.sum().backward()
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert lp.grad.item() == pytest.approx(grad, abs=1e-12)
    expected_clip = float((adv > 0 and ratio > 1.2) or (adv < 0 and ratio < 0.8))
    assert clip_fraction(lp, lp_old, lq - lp_old, torch.ones(1, 1), 0.2).item() == expected_clip


def test_opd_advantage_override_and_helpers():
    mask_BT = make_mask()
    lp, lp_old, lq = opd_inputs(1)
    adv_BT = torch.randn(B, T, generator=gen(2)).requires_grad_()
    lp = lp.requires_grad_()
    loss_BT = sampled_token_opd(lp, lp_old, None, mask_BT, advantage_BT=adv_BT)
    loss_BT.sum().backward()
    assert adv_BT.grad is None  # advantage is detached
    ref_BT = ref_per_position(
        lambda a, b_, c_: ref_opd(a, b_, None, adv=c_), mask_BT, lp.detach().to(F64), lp_old.to(F64),
        adv_BT.detach().to(F64),
    )
    torch.testing.assert_close(loss_BT.detach().to(F64), ref_BT, atol=1e-5, rtol=1e-5)
    # teacher argument is ignored when an advantage is given
    other = sampled_token_opd(lp, lp_old, lq, mask_BT, advantage_BT=adv_BT)
    torch.testing.assert_close(other, loss_BT)
    # opd_advantage: lq - lp_old, detached, zero on masked
    lq_g = lq.clone().requires_grad_()
    a_BT = opd_advantage(lq_g, lp_old, mask_BT)
    assert not a_BT.requires_grad
    torch.testing.assert_close(a_BT, torch.where(mask_BT.bool(), lq - lp_old, 0.0))
    # clip_fraction vs direct definition, zero on masked
    cf_BT = clip_fraction(lp, lp_old, a_BT, mask_BT, 0.2)
    r_BT = torch.exp(lp.detach() - lp_old)
    want = ((a_BT > 0) & (r_BT > 1.2)) | ((a_BT < 0) & (r_BT < 0.8))
    torch.testing.assert_close(cf_BT, (want & mask_BT.bool()).float())
    assert 0 < cf_BT.sum() < mask_BT.sum()


# ------------------------------------------------------------------ §8 token-level truncated IS (opd_tis)
def ref_tis(lp, lp_old, lq, cap, adv=None) -> torch.Tensor:
    """Float64 reference of §8: value −min(r, C)·A, gradient −min(r, C)·A·∇lp (weight detached)."""
    a = float(lq - lp_old) if adv is None else float(adv)
    w = min(math.exp(float(lp.detach() - lp_old)), cap)
    return -w * a * torch.exp(lp - lp.detach())


@pytest.mark.parametrize("cap", [2.0, 1.2, 0.55])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tis_matches_float64_reference_and_gradient(cap, dtype):
    mask_BT = make_mask()
    lp, lp_old, lq = opd_inputs(4, dtype)
    lp = lp.requires_grad_()
    loss_BT = truncated_is_opd(lp, lp_old, lq, mask_BT, cap=cap)
    assert loss_BT.shape == (B, T) and loss_BT.dtype == dtype
    loss_BT.sum().backward()
    lp64 = lp.detach().to(F64).requires_grad_()
    ref_BT = ref_per_position(lambda a, b_, c_: ref_tis(a, b_, c_, cap), mask_BT, lp64, lp_old.to(F64), lq.to(F64))
    ref_BT.sum().backward()
    # float32: lp − lp_old is rounded once (≤ eps32·(|lp| + |lp_old|) ≤ 8 eps32 absolute here, hence relative
    # in exp), then exp and two products add ≤ 3 eps32 relative: 16 eps32 of the largest value bounds it.
    eps = torch.finfo(dtype).eps
    for got, want in ((loss_BT.detach().to(F64), ref_BT.detach()), (lp.grad.to(F64), lp64.grad)):
        tol = 16 * eps * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tol, rtol=16 * eps)
    r = torch.exp((lp.detach() - lp_old).to(F64))
    valid = mask_BT.bool()
    assert (valid & (r > cap)).any() and (valid & (r < cap)).any()  # both sides of the truncation


def test_tis_equals_opd_without_drift_and_handles_overrides_and_extremes():
    mask_BT = make_mask()
    _, lp_old, lq = opd_inputs(5)
    lp_a = lp_old.clone().requires_grad_()
    lp_b = lp_old.clone().requires_grad_()
    tis_BT = truncated_is_opd(lp_a, lp_old, lq, mask_BT, cap=2.0)
    opd_BT = sampled_token_opd(lp_b, lp_old, lq, mask_BT)
    tis_BT.sum().backward()
    opd_BT.sum().backward()
    torch.testing.assert_close(tis_BT, opd_BT, atol=0, rtol=0)  # r = 1 exactly: both are −A
    torch.testing.assert_close(lp_a.grad, lp_b.grad, atol=0, rtol=0)
    # a given advantage replaces lq − lp_old, detached; the teacher may then be None
    adv_BT = torch.randn(B, T, generator=gen(6)).requires_grad_()
    lp, _, _ = opd_inputs(5)
    out = truncated_is_opd(lp, lp_old, None, mask_BT, cap=2.0, advantage_BT=adv_BT)
    ref = ref_per_position(lambda a, b_, c_: ref_tis(a, b_, None, 2.0, adv=c_), mask_BT, lp.to(F64),
                           lp_old.to(F64), adv_BT.detach().to(F64))
    torch.testing.assert_close(out.to(F64), ref, atol=1e-5, rtol=1e-5)
    assert not out.requires_grad  # lp carries no gradient here, and the advantage is detached
    # a huge ratio cannot overflow: the weight is exp(min(lp − lp_old, log C)) = C
    lp_huge = torch.full((1, 2), -0.01, requires_grad=True)
    far = torch.full((1, 2), -300.0)
    w = tis_weight(lp_huge, far, torch.ones(1, 2), cap=2.0)
    assert torch.equal(w, torch.full((1, 2), 2.0))
    loss = truncated_is_opd(lp_huge, far, torch.zeros(1, 2), torch.ones(1, 2), cap=2.0)
    (g,) = torch.autograd.grad(loss.sum(), lp_huge)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="cap"):
        tis_weight(lp, lp_old, mask_BT, cap=0.0)


def test_opd_tis_is_registered_with_its_cap():
    mask_BT = make_mask()
    lp, lp_old, lq = opd_inputs(7)
    spec = BASE_LOSSES["opd_tis"]
    assert spec.uses_advantage and not spec.needs_support and BASE_LOSSES["opd"].uses_advantage
    assert not BASE_LOSSES["lsm"].uses_advantage
    x = LossInputs(mask_BT=mask_BT, logp_BT=lp, logp_old_BT=lp_old, logp_teacher_BT=lq)
    torch.testing.assert_close(spec.fn(x, LossHParams(tis_cap=1.3)),
                               truncated_is_opd(lp, lp_old, lq, mask_BT, cap=1.3), atol=0, rtol=0)
    assert not torch.equal(spec.fn(x, LossHParams(tis_cap=1.3)), spec.fn(x, LossHParams(tis_cap=3.0)))


def test_opd_weighted_mask_multiplies():
    lp, lp_old, lq = opd_inputs(3)
    ones_BT = torch.ones(B, T)
    half_BT = torch.full((B, T), 0.5)
    torch.testing.assert_close(
        sampled_token_opd(lp, lp_old, lq, half_BT), 0.5 * sampled_token_opd(lp, lp_old, lq, ones_BT)
    )


def test_opd_monte_carlo_gradient_is_reverse_kl_gradient():
    """E_{y~p}[grad of OPD at lp = lp_old] = d KL(p||q)/dz = p_j (f_j - Σ p f), f = log p - log q.

    Tolerance: 5 standard errors per component, SE estimated from the N per-sample gradients
    g_i = -A_i (onehot(y_i) - p) (N = 200k, SE ~ 2e-3). The seed is fixed so the test is deterministic;
    we also assert the analytic gradient is far (> 30 SE) from 0, so a zero-gradient bug cannot pass.
    """
    n = 200_000
    z_V = torch.tensor([0.5, -1.0, 1.2, 0.0, -0.3, 0.8], dtype=F64, requires_grad=True)
    logq_V = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.9, -1.5, 0.3], dtype=F64), dim=0)
    logp_V = torch.log_softmax(z_V, dim=0)
    p_V = logp_V.detach().exp()
    y_N = torch.multinomial(p_V, n, replacement=True, generator=gen(7))

    logp_1N = logp_V[y_N][None]
    ones_1N = torch.ones(1, n)
    loss = sampled_token_opd(logp_1N, logp_1N.detach(), logq_V[y_N][None], ones_1N).mean()
    (mc_V,) = torch.autograd.grad(loss, z_V)

    f_V = logp_V.detach() - logq_V
    analytic_V = p_V * (f_V - (p_V * f_V).sum())
    # cross-check the closed form against autograd of the exact reverse KL
    logp2_V = torch.log_softmax(z_V, dim=0)
    (exact_V,) = torch.autograd.grad((logp2_V.exp() * (logp2_V - logq_V)).sum(), z_V)
    torch.testing.assert_close(analytic_V, exact_V)

    onehot_NV = torch.nn.functional.one_hot(y_N, 6).to(F64)
    adv_N = (logq_V - logp_V.detach())[y_N]
    per_sample_NV = -adv_N[:, None] * (onehot_NV - p_V)
    se_V = per_sample_NV.std(dim=0) / math.sqrt(n)
    assert analytic_V.abs().max() > 30 * se_V.max()
    assert ((mc_V - analytic_V).abs() <= 5 * se_V).all(), (mc_V, analytic_V, se_V)

    # Regression: backpropagating lp - lq directly has zero expected gradient (docs/methods.md §2.1 bug).
    naive = (torch.log_softmax(z_V, dim=0)[y_N] - logq_V[y_N]).mean()
    (naive_V,) = torch.autograd.grad(naive, z_V)
    se_naive_V = (onehot_NV - p_V).std(dim=0) / math.sqrt(n)
    assert (naive_V.abs() <= 5 * se_naive_V).all()
    assert ((naive_V - analytic_V).abs() > 10 * se_V).any()


# ------------------------------------------------------------------ §2.2 LSM
def test_lsm_matches_reference_and_gradient():
    mask_BT = make_mask()
    g = gen(10)
    zs_BTK = (2 * torch.randn(B, T, K, generator=g)).requires_grad_()
    zq_BTK = (2 * torch.randn(B, T, K, generator=g)).requires_grad_()
    loss_BT = topk_support_matching(zs_BTK, zq_BTK, mask_BT)
    loss_BT.sum().backward()
    assert zq_BTK.grad is None  # teacher logits are constants
    assert zs_BTK.grad.abs().sum() > 0

    zs64 = zs_BTK.detach().to(F64).requires_grad_()

    def ref(zs, zq):
        return ref_kl(ref_log_softmax(zs), ref_log_softmax(zq))

    ref_BT = ref_per_position(ref, mask_BT, zs64, zq_BTK.detach().to(F64))
    ref_BT.sum().backward()
    torch.testing.assert_close(loss_BT.detach().to(F64), ref_BT.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs_BTK.grad.to(F64), zs64.grad, atol=1e-5, rtol=1e-5)
    assert (loss_BT >= 0).all() and (loss_BT[mask_BT.bool()] > 0).all()
    assert (zs_BTK.grad[~mask_BT.bool()] == 0).all()
    # no mask: every position computed
    full_BT = topk_support_matching(zs_BTK, zq_BTK)
    torch.testing.assert_close(full_BT[0], loss_BT[0])
    assert (full_BT[2] > 0).all()


def test_lsm_zero_for_constant_shift():
    zs_BTK = 3 * torch.randn(B, T, K, generator=gen(11))
    shift_BT1 = 5 * torch.randn(B, T, 1, generator=gen(12))
    loss_BT = topk_support_matching(zs_BTK, zs_BTK + shift_BT1)
    torch.testing.assert_close(loss_BT, torch.zeros(B, T), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ §2.3 full-vocabulary divergences
def full_logits(seed: int, dtype=torch.float32):
    g = gen(seed)
    zs_BTV = 2 * torch.randn(B, T, V, generator=g)
    return zs_BTV.to(dtype), (2 * torch.randn(B, T, V, generator=g)).to(dtype)


@pytest.mark.parametrize(
    "name, fn, ref",
    [
        ("fkl", forward_kl, lambda lp, lq: ref_kl(lq, lp)),
        ("rkl", reverse_kl, lambda lp, lq: ref_kl(lp, lq)),
        ("jsd0.3", lambda s, t, m: generalized_jsd(s, t, m, beta=0.3), lambda lp, lq: ref_jsd(lp, lq, 0.3)),
        ("jsd0.5", lambda s, t, m: generalized_jsd(s, t, m, beta=0.5), lambda lp, lq: ref_jsd(lp, lq, 0.5)),
        ("jsd0.9", lambda s, t, m: generalized_jsd(s, t, m, beta=0.9), lambda lp, lq: ref_jsd(lp, lq, 0.9)),
    ],
)
def test_full_divergences_match_reference(name, fn, ref):
    mask_BT = make_mask()
    zs_BTV, zq_BTV = full_logits(20)
    zs_BTV.requires_grad_()
    loss_BT = fn(zs_BTV, zq_BTV, mask_BT)
    loss_BT.sum().backward()
    zs64 = zs_BTV.detach().to(F64).requires_grad_()
    ref_BT = ref_per_position(
        lambda zs, zq: ref(ref_log_softmax(zs), ref_log_softmax(zq)), mask_BT, zs64, zq_BTV.to(F64)
    )
    ref_BT.sum().backward()
    torch.testing.assert_close(loss_BT.detach().to(F64), ref_BT.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs_BTV.grad.to(F64), zs64.grad, atol=1e-5, rtol=1e-5)
    assert (loss_BT[mask_BT.bool()] > 0).all()


def test_jsd_endpoints_zero_and_continuity():
    zs_BTV, zq_BTV = full_logits(21, F64)
    fkl_BT, rkl_BT = forward_kl(zs_BTV, zq_BTV), reverse_kl(zs_BTV, zq_BTV)
    assert not torch.allclose(fkl_BT, rkl_BT)
    torch.testing.assert_close(generalized_jsd(zs_BTV, zq_BTV, beta=0.0), fkl_BT)
    torch.testing.assert_close(generalized_jsd(zs_BTV, zq_BTV, beta=1.0), rkl_BT)
    # interior: >= 0, symmetric at 0.5, zero iff equal
    for beta in (1e-3, 0.2, 0.5, 0.8, 1 - 1e-3):
        assert (generalized_jsd(zs_BTV, zq_BTV, beta=beta) > 0).all()
        torch.testing.assert_close(
            generalized_jsd(zs_BTV, zs_BTV + 3.0, beta=beta), torch.zeros(B, T, dtype=F64), atol=1e-12, rtol=0
        )
    torch.testing.assert_close(
        generalized_jsd(zs_BTV, zq_BTV, beta=0.5), generalized_jsd(zq_BTV, zs_BTV, beta=0.5)
    )
    # continuity up to scale: JSD_b / b -> KL(q||p) as b -> 0, JSD_b / (1-b) -> KL(p||q) as b -> 1.
    # The error is O(b) (resp. O(1-b)): shrinking b by 10x shrinks it by ~10x.
    def rel_err(beta, scale, target_BT):
        return ((generalized_jsd(zs_BTV, zq_BTV, beta=beta) / scale - target_BT).abs() / target_BT).max()

    err0 = [rel_err(b, b, fkl_BT) for b in (1e-4, 1e-5, 1e-6)]
    err1 = [rel_err(1 - b, b, rkl_BT) for b in (1e-4, 1e-5, 1e-6)]
    for err in (err0, err1):
        assert err[0] < 5e-2 and err[1] < err[0] / 5 and err[2] < err[1] / 5 and err[2] < 1e-3
    # the raw value goes to 0 at the ends (why the endpoints are defined explicitly, as in TRL)
    assert generalized_jsd(zs_BTV, zq_BTV, beta=1e-6).max() < 1e-4
    assert generalized_jsd(zs_BTV, zq_BTV, beta=1 - 1e-6).max() < 1e-4
    with pytest.raises(ValueError):
        generalized_jsd(zs_BTV, zq_BTV, beta=1.5)


@pytest.mark.parametrize(
    "fn",
    [forward_kl, reverse_kl, generalized_jsd, topk_forward_kl, topk_reverse_kl, topk_generalized_jsd],
)
def test_divergences_teacher_is_constant(fn):
    zs_BTV, zq_BTV = full_logits(23)
    student = torch.log_softmax(zs_BTV, -1)[..., :K].clone().requires_grad_()
    teacher = torch.log_softmax(zq_BTV, -1)[..., :K].clone().requires_grad_()
    fn(student, teacher, make_mask()).sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_full_divergences_zero_probability_entries():
    """Both models give probability 0 (logit -inf) to some ids: 0 log 0 = 0, finite grads."""
    zs_BTV, zq_BTV = full_logits(22)
    zs_BTV[..., :3] = -math.inf
    zq_BTV[..., :3] = -math.inf
    zs_BTV.requires_grad_()
    for fn in (forward_kl, reverse_kl, lambda s, t: generalized_jsd(s, t, beta=0.4)):
        loss_BT = fn(zs_BTV, zq_BTV)
        (grad,) = torch.autograd.grad(loss_BT.sum(), zs_BTV)
        want_BT = fn(zs_BTV.detach()[..., 3:], zq_BTV[..., 3:])
        torch.testing.assert_close(loss_BT.detach(), want_BT)
        assert torch.isfinite(grad).all()


# ------------------------------------------------------------------ §2.3 top-K divergences
def topk_logps(seed: int, dtype=torch.float32, k: int = K):
    zs_BTV, zq_BTV = full_logits(seed, F64)
    ls_BTV, lq_BTV = torch.log_softmax(zs_BTV, -1), torch.log_softmax(zq_BTV, -1)
    ids_BTK = lq_BTV.topk(k, dim=-1).indices
    return ls_BTV.gather(-1, ids_BTK).to(dtype), lq_BTV.gather(-1, ids_BTK).to(dtype), ls_BTV, lq_BTV


TOPK_CASES = [
    ("fkl", topk_forward_kl, lambda lp, lq: ref_kl(lq, lp)),
    ("rkl", topk_reverse_kl, lambda lp, lq: ref_kl(lp, lq)),
    ("jsd", lambda s, t, m, tail: topk_generalized_jsd(s, t, m, beta=0.3, tail=tail), None),
]


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("name, fn, ref", TOPK_CASES)
def test_topk_divergences_match_reference(name, fn, ref, tail):
    ref = ref or (lambda lp, lq: ref_jsd(lp, lq, 0.3))
    mask_BT = make_mask()
    ls_BTK, lq_BTK, _, _ = topk_logps(30)
    ls_BTK.requires_grad_()
    loss_BT = fn(ls_BTK, lq_BTK, mask_BT, tail=tail)
    loss_BT.sum().backward()
    ls64 = ls_BTK.detach().to(F64).requires_grad_()
    ref_BT = ref_per_position(
        lambda lp, lq: ref(ref_support(lp, tail), ref_support(lq, tail)), mask_BT, ls64, lq_BTK.to(F64)
    )
    ref_BT.sum().backward()
    torch.testing.assert_close(loss_BT.detach().to(F64), ref_BT.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ls_BTK.grad.to(F64), ls64.grad, atol=1e-5, rtol=1e-5)
    assert (loss_BT[mask_BT.bool()] > 0).all()


def test_topk_tail_vs_renormalized_and_full_support():
    ls_BTK, lq_BTK, ls_BTV, lq_BTV = topk_logps(31, F64)
    renorm_BT = topk_reverse_kl(ls_BTK, lq_BTK, tail=False)
    assert not torch.allclose(topk_reverse_kl(ls_BTK, lq_BTK, tail=True), renorm_BT)
    # renormalized reverse KL on K ids is exactly LSM on the same ids
    torch.testing.assert_close(renorm_BT, topk_support_matching(ls_BTK, lq_BTK))
    # coarse-graining lowers KL: tail version <= full-vocabulary KL
    assert (topk_forward_kl(ls_BTK, lq_BTK) <= forward_kl(ls_BTV, lq_BTV) + 1e-12).all()
    # K = V: the tail is empty (floored, same on both sides) and every top-K form equals the full one
    ls_full, lq_full, ls_BTV, lq_BTV = topk_logps(31, torch.float32, k=V)
    for tail in (True, False):
        fkl_BT, rkl_BT = forward_kl(ls_BTV, lq_BTV).float(), reverse_kl(ls_BTV, lq_BTV).float()
        torch.testing.assert_close(topk_forward_kl(ls_full, lq_full, tail=tail), fkl_BT)
        torch.testing.assert_close(topk_reverse_kl(ls_full, lq_full, tail=tail), rkl_BT)
        torch.testing.assert_close(
            topk_generalized_jsd(ls_full, lq_full, beta=0.6, tail=tail),
            generalized_jsd(ls_BTV, lq_BTV, beta=0.6).float(),
        )
    # sums slightly above 1 by rounding: still finite, with finite gradients
    over_BTK = (ls_full + 1e-6).requires_grad_()
    loss_BT = topk_reverse_kl(over_BTK, lq_full)
    (grad,) = torch.autograd.grad(loss_BT.sum(), over_BTK)
    assert torch.isfinite(loss_BT).all() and torch.isfinite(grad).all()


def test_topk_jsd_endpoints():
    ls_BTK, lq_BTK, _, _ = topk_logps(32, F64)
    for tail in (True, False):
        fkl_BT = topk_forward_kl(ls_BTK, lq_BTK, tail=tail)
        rkl_BT = topk_reverse_kl(ls_BTK, lq_BTK, tail=tail)
        torch.testing.assert_close(topk_generalized_jsd(ls_BTK, lq_BTK, beta=0.0, tail=tail), fkl_BT)
        torch.testing.assert_close(topk_generalized_jsd(ls_BTK, lq_BTK, beta=1.0, tail=tail), rkl_BT)
        b = 1e-6
        jsd0_BT = topk_generalized_jsd(ls_BTK, lq_BTK, beta=b, tail=tail)
        jsd1_BT = topk_generalized_jsd(ls_BTK, lq_BTK, beta=1 - b, tail=tail)
        torch.testing.assert_close(jsd0_BT / b, fkl_BT, rtol=1e-3, atol=0)
        torch.testing.assert_close(jsd1_BT / b, rkl_BT, rtol=1e-3, atol=0)


# ------------------------------------------------------------------ masked garbage never leaks
def _garbage(x: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    bad = ~mask_BT.bool()
    vals = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)
    fill = vals[torch.arange(int(bad.sum())) % 3]
    if x.dim() == 3:
        x[bad] = fill[:, None].expand(-1, x.shape[-1])
    else:
        x[bad] = fill
    return x


def test_masked_positions_are_exactly_zero_with_garbage_inputs():
    mask_BT = make_mask()
    bad = ~mask_BT.bool()
    lp, lp_old, lq = opd_inputs(40)
    zs_BTV, zq_BTV = full_logits(41)
    ls_BTK, lq_BTK, _, _ = topk_logps(42)
    cases = [
        (lambda x: sampled_token_opd(x, _garbage(lp_old, mask_BT), _garbage(lq, mask_BT), mask_BT), lp),
        (lambda x: sampled_token_opd(x, lp_old, lq, mask_BT, advantage_BT=_garbage(lq, mask_BT)), lp),
        (lambda x: truncated_is_opd(x, _garbage(lp_old, mask_BT), _garbage(lq, mask_BT), mask_BT), lp),
        (lambda x: topk_support_matching(x, _garbage(lq_BTK, mask_BT), mask_BT), ls_BTK),
        (lambda x: forward_kl(x, _garbage(zq_BTV, mask_BT), mask_BT), zs_BTV),
        (lambda x: reverse_kl(x, _garbage(zq_BTV, mask_BT), mask_BT), zs_BTV),
        (lambda x: generalized_jsd(x, _garbage(zq_BTV, mask_BT), mask_BT, beta=0.5), zs_BTV),
        (lambda x: topk_forward_kl(x, _garbage(lq_BTK, mask_BT), mask_BT), ls_BTK),
        (lambda x: topk_reverse_kl(x, _garbage(lq_BTK, mask_BT), mask_BT, tail=False), ls_BTK),
        (lambda x: topk_generalized_jsd(x, _garbage(lq_BTK, mask_BT), mask_BT, beta=0.7), ls_BTK),
    ]
    for fn, clean in cases:
        x = _garbage(clean, mask_BT).requires_grad_()
        loss_BT = fn(x)
        assert (loss_BT[bad] == 0).all() and torch.isfinite(loss_BT).all()
        (grad,) = torch.autograd.grad(loss_BT.sum(), x)
        assert torch.isfinite(grad).all() and (grad[bad] == 0).all()
    a_BT = opd_advantage(_garbage(lq, mask_BT), _garbage(lp_old, mask_BT), mask_BT)
    assert (a_BT[bad] == 0).all() and torch.isfinite(a_BT).all()
    cf_BT = clip_fraction(_garbage(lp, mask_BT), lp_old, _garbage(lq, mask_BT), mask_BT, 0.2)
    assert (cf_BT[bad] == 0).all()


def test_low_precision_inputs_computed_in_float32():
    lp, lp_old, lq = opd_inputs(50)
    out = sampled_token_opd(lp.bfloat16(), lp_old.bfloat16(), lq.bfloat16(), torch.ones(B, T))
    assert out.dtype == torch.float32
    zs_BTV, zq_BTV = full_logits(51)
    assert reverse_kl(zs_BTV.half(), zq_BTV.half()).dtype == torch.float32
    assert topk_support_matching(zs_BTV[..., :K].bfloat16(), zq_BTV[..., :K]).dtype == torch.float32


# ------------------------------------------------------------------ §2.4 special-token masking
def test_special_token_mask_first_occurrence_only():
    ids_BT = torch.tensor(
        [
            [5, 7, 5, 9, 7, 1, 0],
            [7, 5, 7, 5, 3, 0, 0],  # first 7 is on a masked (prompt) position: the next one is masked
            [5, 5, 5, 5, 5, 5, 5],  # fully padded row
        ]
    )
    mask_BT = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32
    )
    before = mask_BT.clone()
    out_BT = special_token_mask(ids_BT, mask_BT, [5, 7])
    want_BT = torch.tensor(
        [[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32
    )
    torch.testing.assert_close(out_BT, want_BT)
    torch.testing.assert_close(mask_BT, before)  # input untouched
    assert out_BT.dtype == mask_BT.dtype
    # tensor / tuple ids, bool masks, absent ids, empty list
    torch.testing.assert_close(special_token_mask(ids_BT, mask_BT, torch.tensor([7, 5])), want_BT)
    torch.testing.assert_close(special_token_mask(ids_BT, mask_BT.bool(), (5, 7)), want_BT.bool())
    torch.testing.assert_close(special_token_mask(ids_BT, mask_BT, [42, 43]), mask_BT)
    torch.testing.assert_close(special_token_mask(ids_BT, mask_BT, []), mask_BT)
    # the token sits on a padded position only: unchanged
    torch.testing.assert_close(special_token_mask(ids_BT, mask_BT, [0]), mask_BT)
