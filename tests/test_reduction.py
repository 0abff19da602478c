"""Reduction modes against float64 loops, and invariance of the update to micro-batch splits."""

import pytest
import torch

from opdkit.losses.reduction import (
    REDUCTION_MODES,
    loss_denominator,
    loss_numerator,
    reduce_loss,
    reduction_stats,
)


def _batch(B=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[1] = 0  # a row with no valid token
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.1
    return loss, mask, w


def _reference(loss, mask, mode, w=None, constant=None):
    """Float64 loops, straight from docs/methods.md §3 / §4 step 5 (g̃ = g / mean over valid tokens)."""
    B, T = loss.shape
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i, t] > 0]
    wt = {}
    if w is not None:
        mean_w = sum(float(w[i, t]) for i, t in valid) / len(valid)
        wt = {(i, t): float(w[i, t]) / mean_w for i, t in valid}
    lw = {(i, t): float(loss[i, t]) * wt.get((i, t), 1.0) for i, t in valid}
    rows = [i for i in range(B) if any(mask[i, t] > 0 for t in range(T))]
    if mode == "token-mean":
        return sum(lw.values()) / len(valid)
    if mode == "seq-mean-token-mean":
        return sum(sum(lw[i, t] for t in range(T) if (i, t) in lw) / sum(1 for t in range(T) if (i, t) in lw)
                   for i in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(lw.values()) / len(rows)
    return sum(lw.values()) / constant


@pytest.mark.parametrize("mode", REDUCTION_MODES)
@pytest.mark.parametrize("weighted", [False, True])
def test_modes_match_reference(mode, weighted):
    loss, mask, w = _batch()
    got = reduce_loss(loss, mask, mode, weights_BT=w if weighted else None, constant=10.0)
    ref = _reference(loss, mask, mode, w if weighted else None, constant=10.0)
    assert abs(float(got) - ref) < 1e-5 * max(1.0, abs(ref))


def test_weighted_token_mean_is_weighted_average():
    loss, mask, w = _batch(seed=1)
    got = reduce_loss(loss, mask, "token-mean", weights_BT=w)
    assert torch.isclose(got.double(), (w * loss * mask).sum() / (w * mask).sum(), atol=1e-6)
    unnormalized = reduce_loss(loss, mask, "token-mean", weights_BT=w, normalize_weights=False)
    assert torch.isclose(unnormalized.double(), (w * loss * mask).sum() / mask.sum(), atol=1e-6)


def test_masked_positions_never_leak_nan():
    loss, mask, w = _batch(seed=2)
    loss = loss.masked_fill(mask == 0, float("nan"))
    for mode in REDUCTION_MODES:
        assert torch.isfinite(reduce_loss(loss, mask, mode, weights_BT=w, constant=3.0))


def test_empty_batch_is_zero_not_nan():
    loss = torch.randn(2, 3)
    assert float(reduce_loss(loss, torch.zeros(2, 3), "token-mean")) == 0.0


def test_errors_name_the_fix():
    loss, mask, _ = _batch()
    with pytest.raises(ValueError, match="valid: token-mean"):
        reduce_loss(loss, mask, "mean")
    with pytest.raises(ValueError, match="constant > 0"):
        reduce_loss(loss, mask, "constant")


class _TinyPolicy(torch.nn.Module):
    """Per-token loss l_it = (x_it · θ)^2 + sin(x_it · θ) so the gradient depends on every token."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))

    def forward(self, x_BTD):
        s = x_BTD @ self.theta
        return s**2 + torch.sin(s)


def _full_grad(model, x, mask, w, mode):
    model.zero_grad()
    reduce_loss(model(x), mask, mode, weights_BT=w, constant=7.0).backward()
    return model.theta.grad.clone()


@pytest.mark.parametrize("mode", REDUCTION_MODES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n_micro", [1, 2, 4, 8])
def test_update_is_invariant_to_microbatch_split(mode, weighted, n_micro):
    _, mask, w = _batch(seed=3)
    x = torch.randn(8, 6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w = w if weighted else None
    model = _TinyPolicy()
    ref = _full_grad(model, x, mask, w, mode)

    size = 8 // n_micro
    chunks = [slice(i, i + size) for i in range(0, 8, size)]
    # style 1: global stats first, then backward each micro-batch's numerator / global denominator
    stats = sum(reduction_stats(mask[c], None if w is None else w[c]) for c in chunks)
    model.zero_grad()
    for c in chunks:
        reduce_loss(model(x[c]), mask[c], mode, weights_BT=None if w is None else w[c], constant=7.0,
                    stats=stats).backward()
    torch.testing.assert_close(model.theta.grad, ref, atol=1e-10, rtol=1e-10)

    # style 2: weights known only during each forward -> backward numerators, scale grads at the end
    model.zero_grad()
    stats = torch.zeros(3, dtype=torch.float64)
    for c in chunks:
        wc = None if w is None else w[c]
        loss_numerator(model(x[c]), mask[c], mode, weights_BT=wc).backward()
        stats = stats + reduction_stats(mask[c], wc)
    model.theta.grad /= loss_denominator(stats, mode, constant=7.0, weighted=w is not None).double()
    torch.testing.assert_close(model.theta.grad, ref, atol=1e-6, rtol=1e-6)
