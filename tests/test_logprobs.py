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
