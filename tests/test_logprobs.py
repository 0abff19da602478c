"""Chunked log-probs / top-K / gathered logits equal a float64 naive reference, values and gradients."""

import pytest
import torch

from opdkit.losses.logprobs import fused_logprobs, logprobs_from_logits, naive_logprobs


def _inputs(B=2, T=5, H=8, V=13, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    gids = torch.randint(0, V, (B, T, K), generator=g)
    return h, W, ids, gids


def _reference(h, W, ids, gids, temperature):
    z = (h.double() @ W.double().T) / temperature
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, ids[..., None]).squeeze(-1) - lse
    return logp, lse, z.gather(-1, gids), z


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_matches_float64_reference_values_and_grads(chunk_size, temperature):
    h, W, ids, gids = _inputs()
    a, b, c = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5, 3)
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = fused_logprobs(h1, W1, ids, gather_ids_BTK=gids, topk=4, temperature=temperature,
                         chunk_size=chunk_size)
    ((a * out.logp_BT).sum() + (b * out.lse_BT).sum() + (c * out.gathered_logits_BTK).sum()).backward()

    h2, W2 = h.double().requires_grad_(), W.double().requires_grad_()
    logp, lse, gath, z = _reference(h2, W2, ids, gids, temperature)
    ((a.double() * logp).sum() + (b.double() * lse).sum() + (c.double() * gath).sum()).backward()

    torch.testing.assert_close(out.logp_BT.double(), logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lse_BT.double(), lse.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.gathered_logits_BTK.double(), gath.detach(), atol=1e-5, rtol=1e-5)
    top = z.detach().topk(4, dim=-1)
    assert torch.equal(out.topk_ids_BTK, top.indices)
    torch.testing.assert_close(out.topk_logits_BTK.double(), top.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(W1.grad.double(), W2.grad, atol=1e-4, rtol=1e-4)


def test_fused_frozen_head_and_no_gather():
    h, W, ids, _ = _inputs(seed=1)
    h1 = h.clone().requires_grad_()
    out = fused_logprobs(h1, W, ids, chunk_size=2)
    assert out.gathered_logits_BTK is None and out.topk_ids_BTK is None
    out.logp_BT.sum().backward()
    h2 = h.double().requires_grad_()
    _reference(h2, W.double(), ids, torch.zeros(2, 5, 1, dtype=torch.long), 1.0)[0].sum().backward()
    torch.testing.assert_close(h1.grad.double(), h2.grad, atol=1e-4, rtol=1e-4)


def test_fused_bf16_weights_give_float32_outputs_close_to_reference():
    h, W, ids, _ = _inputs(seed=2)
    out = fused_logprobs(h.bfloat16(), W.bfloat16(), ids, chunk_size=3)
    assert out.logp_BT.dtype == torch.float32
    ref = _reference(h.bfloat16().double(), W.bfloat16().double(), ids, ids[..., None], 1.0)[0]
    torch.testing.assert_close(out.logp_BT.double(), ref, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_logits_equals_naive(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 17, generator=g).to(dtype)
    ids = torch.randint(0, 17, (3, 6), generator=g)
    gids = torch.randint(0, 17, (3, 6, 4), generator=g)
    a = logprobs_from_logits(logits, ids, gather_ids_BTK=gids, topk=5, chunk_size=4)
    b = naive_logprobs(logits, ids, topk=5)
    torch.testing.assert_close(a.logp_BT, b.logp_BT)
    torch.testing.assert_close(a.lse_BT, b.lse_BT)
    assert torch.equal(a.topk_ids_BTK, b.topk_ids_BTK)
    torch.testing.assert_close(a.gathered_logits_BTK, logits.float().gather(-1, gids))
    # log-probs of a distribution: exp sums to 1 over the vocabulary
    full = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(a.logp_BT.double(), full.gather(-1, ids[..., None]).squeeze(-1),
                               atol=1e-5, rtol=1e-5)


def test_shape_errors_are_clear():
    h, W, ids, _ = _inputs()
    with pytest.raises(ValueError, match="hidden size"):
        fused_logprobs(h, W[:, :4], ids)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_logprobs(h, W, ids, chunk_size=0)


EPS32 = torch.finfo(torch.float32).eps
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significand bits)


def _fp32_logit_bound(h_NH, W_VH):
    """Worst-case float32 error of logits ``z = h W^T`` summed over H terms: ``H · eps32 · Σ_i |h_i||w_i|``."""
    return h_NH.shape[-1] * EPS32 * (h_NH.double().abs() @ W_VH.double().abs().T)


def _fp32_logp_bound(h_NH, W_VH, ids_N, z_NV):
    """``logp = z_y − lse(z)``: the error of z at y, plus the largest error of z (moves lse at most that
    much), plus the float32 rounding of a log-sum-exp over V terms (``(V + 2) · eps32 · (1 + |lse|)``)."""
    e_NV = _fp32_logit_bound(h_NH, W_VH)
    lse = torch.logsumexp(z_NV, -1)
    V = W_VH.shape[0]
    return e_NV.gather(1, ids_N[:, None]).squeeze(1) + e_NV.max(-1).values + (V + 2) * EPS32 * (1 + lse.abs())


def _bf16_inputs(N=12, H=64, V=50, seed=5, scale=2.0):
    """bf16 hidden states / head whose logits are large (|z| ~ 10-30), where rounding them to bf16 costs
    ~0.05 nat while float32 logits are exact to ~1e-4."""
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(N, H, generator=g)).bfloat16()
    W = torch.randn(V, H, generator=g).bfloat16()
    ids = torch.randint(0, V, (N,), generator=g)
    return h, W, ids


def test_bf16_hidden_states_give_float32_logits_logprobs_and_topk():
    """Teacher scoring from a bf16 model: the logits must not be rounded to bf16 before the log-softmax.
    Reference: float64 on the same bf16 values (exactly representable), so only float32 rounding of the
    product and of the log-sum-exp is allowed (bounds above); bf16 logits miss it by ~100x."""
    h, W, ids = _bf16_inputs()
    out = fused_logprobs(h[None], W, ids[None], topk=5, chunk_size=5)
    z = h.double() @ W.double().T
    ref_logp = z.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(z, -1)
    bound = _fp32_logp_bound(h, W, ids, z)
    err = (out.logp_BT[0].double() - ref_logp).abs()
    assert out.logp_BT.dtype == torch.float32
    assert bool((err <= bound).all()), (err.max(), bound.min())
    # top-K logits: the largest K float64 logits, each within its float32 bound
    top = z.topk(5, dim=-1).values
    e_max = _fp32_logit_bound(h, W).max(-1, keepdim=True).values
    assert bool(((out.topk_logits_BTK[0].double() - top).abs() <= e_max).all())
    torch.testing.assert_close(out.lse_BT[0].double(), torch.logsumexp(z, -1), atol=float(bound.max()), rtol=0)


def test_fused_under_cpu_autocast_forward_and_backward_match_float64():
    """Under bf16 autocast (float32 master weights) the product's operands are bf16, its result float32;
    ``custom_fwd`` / ``custom_bwd`` make the backward (called outside autocast, as usual) recompute the
    forward's logits with the forward's dtype.

    Reference: float64 on the bf16-rounded operands. Forward: the float32 bounds above. Backward: the
    gradient of the logits ``dz`` is rounded to bf16 for the two products (relative error ``u_bf16`` per
    term), so ``|Δgrad_h[n,i]| ≤ 2 u_bf16 Σ_v |dz_nv| |W_vi|`` and ``|Δgrad_W[v,i]| ≤ 2 u_bf16 Σ_n |dz_nv| |h_ni|``
    (the factor 2 covers the float32 error of ``dz`` itself and the rounding of the result)."""
    hb, Wb, ids = _bf16_inputs(seed=6)
    h, W = hb.float().requires_grad_(), Wb.float().requires_grad_()
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(ids.shape[0], generator=g), torch.randn(ids.shape[0], generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_logprobs(h[None], W, ids[None], chunk_size=5)
    ((a * out.logp_BT[0]).sum() + (b * out.lse_BT[0]).sum()).backward()

    h64, W64 = hb.double().requires_grad_(), Wb.double().requires_grad_()
    z = h64 @ W64.T
    z.retain_grad()
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, ids[:, None]).squeeze(1) - lse
    ((a.double() * logp).sum() + (b.double() * lse).sum()).backward()

    bound = _fp32_logp_bound(hb, Wb, ids, z.detach())
    assert bool(((out.logp_BT[0].double() - logp.detach()).abs() <= bound).all())
    dz = z.grad.abs()
    bound_h = 2 * U_BF16 * (dz @ W64.detach().abs())
    bound_w = 2 * U_BF16 * (dz.T @ h64.detach().abs())
    assert bool(((h.grad.double() - h64.grad).abs() <= bound_h).all()), (h.grad.double() - h64.grad).abs().max()
    assert bool(((W.grad.double() - W64.grad).abs() <= bound_w).all()), (W.grad.double() - W64.grad).abs().max()


def test_bf16_teacher_scoring_is_float32_from_its_hidden_states(tiny_models):
    """score_with_teacher on a bf16 teacher: log q and the top-K logits equal float64 on the teacher's own
    bf16 hidden states and head, within the float32 bounds (not bf16-rounded logits)."""
    from opdkit.rollout.sampler import SamplingParams, sample_rollouts
    from opdkit.rollout.scoring import decoder_and_head, response_hidden_states
    from opdkit.rollout.teacher import score_with_teacher
    from opdkit.runtime.models import load_model, load_tokenizer

    student_dir, teacher_dir, _ = tiny_models
    tok = load_tokenizer(student_dir)
    teacher = load_model(teacher_dir, dtype=torch.bfloat16, device="cpu").eval()
    with torch.no_grad():  # large logits, where bf16 rounding of them is visible
        decoder_and_head(teacher)[1].mul_(8.0)
    prompts = [tok(f"{i}+{i}=")["input_ids"] for i in range(3)]
    batch = sample_rollouts(load_model(student_dir), prompts, SamplingParams(max_new_tokens=6),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    scored = score_with_teacher(teacher, batch, topk=4, microbatch_size=8)
    with torch.no_grad():
        h = response_hidden_states(teacher, batch)  # the same single micro-batch, bf16
    W = decoder_and_head(teacher)[1]
    assert h.dtype == torch.bfloat16 and W.dtype == torch.bfloat16
    mask = batch.response_mask_BT.bool()
    h_NH, ids_N = h[mask], batch.response_ids_BT[mask]
    z = h_NH.double() @ W.double().T
    ref = z.gather(1, ids_N[:, None]).squeeze(1) - torch.logsumexp(z, -1)
    err = (scored.teacher_logp_BT[mask].double() - ref).abs()
    assert bool((err <= _fp32_logp_bound(h_NH, W, ids_N, z)).all()), err.max()
    e_max = _fp32_logit_bound(h_NH, W).max(-1, keepdim=True).values
    top_err = (scored.teacher_topk_logits_BTK[mask].double() - z.topk(4, dim=-1).values).abs()
    assert bool((top_err <= e_max).all()), top_err.max()
