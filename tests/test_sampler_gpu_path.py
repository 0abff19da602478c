"""The sampler's GPU-oriented paths, tested on CPU: KV-cache budget and chunks, finished-row dropping,
the top-k-prefiltered top-p against a float64 full-sort reference, the sampling-dtype copy and
one-dtype cache, and the lean step's check against the model's own forward (with its fallback).

Tolerances: log-probs of the same rows computed in batches of different composition differ only by
float32 summation order (observed ~1e-7; 1e-5 allowed); bf16 sampling vs a bf16 recomputation 3e-2.
"""

import pytest
import torch

from opdkit.rollout import decode_steps, token_sampling
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3

V, PAD = 32, 0
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22, 23, 24, 25]]


def _model(seed=0):
    return tiny_qwen3(TinyQwen3Spec(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    head_dim=8, intermediate_size=64), seed=seed)


def _sample(model, params, seed=1, **kw):
    kw = {"eos_token_ids": [2, 7, 11, 13], "pad_token_id": PAD, **kw}
    return sample_rollouts(model, PROMPTS, params, generator=torch.Generator().manual_seed(seed), **kw)


def _same(a, b, atol=1e-5):
    assert torch.equal(a.response_ids_BT, b.response_ids_BT)
    assert torch.equal(a.response_mask_BT, b.response_mask_BT) and a.stop_reasons == b.stop_reasons
    torch.testing.assert_close(a.logp_old_BT, b.logp_old_BT, atol=atol, rtol=0)


# --------------------------------------------------------------------------- budget and chunks

def test_chunked_sampling_equals_one_batch(monkeypatch):
    """A KV budget of 3 rows samples 12 rows in 4 chunks with the same tokens and log-probs."""
    model = _model()
    p = SamplingParams(max_new_tokens=20, samples_per_prompt=3)
    one = _sample(model, p)
    per_row = decode_steps.kv_bytes_per_token(model.config, torch.float32) * (9 + 20)
    calls = []
    real = decode_steps.make_cache
    monkeypatch.setattr("opdkit.rollout.sampler.make_cache", lambda *a: calls.append(a) or real(*a))
    chunked = _sample(model, SamplingParams(max_new_tokens=20, samples_per_prompt=3,
                                            max_cache_gb=3.5 * per_row / 1e9))
    assert len(calls) == 4
    assert len(set(one.response_lengths_B.tolist())) > 1  # chunks end at different steps
    _same(one, chunked)


def test_budget_below_one_row_names_the_field():
    with pytest.raises(ValueError, match="max_cache_gb"):
        _sample(_model(), SamplingParams(max_new_tokens=4, max_cache_gb=1e-9))


def test_finished_rows_leave_the_batch(monkeypatch):
    """Rows are dropped from the cache as they finish; the samples equal a run that keeps them."""
    model = _model()
    p = SamplingParams(max_new_tokens=24, samples_per_prompt=4)
    sizes = []
    real = decode_steps.PreallocatedLayer.select
    monkeypatch.setattr(decode_steps.PreallocatedLayer, "select",
                        lambda self, idx: sizes.append(len(idx)) or real(self, idx))
    dropped = _sample(model, p)
    assert sizes and sizes[-1] < 16  # the active batch shrank
    kept = _sample(model, p, kv_cache="dynamic")  # no compaction with transformers' cache
    _same(dropped, kept)


# --------------------------------------------------------------------------- top-p

def _reference_keep(z, top_k, top_p):
    """float64 full sort: top-k, then keep tokens whose strictly-more-likely mass is < top_p."""
    z = z.double()
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.shape[1]:
        keep &= z >= z.topk(top_k, dim=-1).values[:, -1:]
    if top_p < 1:
        p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        zs, order = z.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True)
        ps = p.gather(1, order)
        excl = ps.cumsum(-1) - ps
        n = (excl < top_p).sum(-1, keepdim=True).clamp_min(1)
        keep &= z >= zs.gather(1, n - 1)
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (0, 0.999), (20, 0.9), (0, 1.0), (7, 1.0)])
@pytest.mark.parametrize("prefilter", [128, 8])
def test_prefiltered_top_p_equals_full_sort(monkeypatch, top_k, top_p, prefilter):
    """Peaked and flat rows (flat ones need more than the prefilter: the full-sort fallback)."""
    monkeypatch.setattr(token_sampling, "TOP_P_PREFILTER", prefilter)
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.05, 0.3, 1.0, 3.0, 8.0]).repeat_interleave(8)[:, None]
    z = torch.randn(40, 1000, generator=g) * scale
    thresh = token_sampling.filter_threshold(z, top_k, top_p)
    keep = torch.ones_like(z, dtype=torch.bool) if thresh is None else z >= thresh
    ref = _reference_keep(z, top_k, top_p)
    assert torch.equal(keep, ref)
    if not top_k and top_p < 1:
        assert ref.sum(-1).max() > prefilter  # the fallback was needed for some rows (flat ones) ...
        assert ref.sum(-1).min() < prefilter  # ... and not for others


def test_row_uniforms_are_uniform_and_per_row():
    u = token_sampling.row_uniforms(7, torch.arange(200_000), 5)
    assert u.shape == (200_000, 1) and float(u.min()) > 0 and float(u.max()) <= 1
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    torch.testing.assert_close(hist, torch.full((10,), 0.1), atol=0.005, rtol=0)  # ~7 sigma
    sub = token_sampling.row_uniforms(7, torch.tensor([3, 99_999]), 5)
    assert torch.equal(sub, u[[3, 99_999]])  # a row's uniform does not depend on its batch
    assert not torch.equal(u, token_sampling.row_uniforms(7, torch.arange(200_000), 6))
    assert not torch.equal(u, token_sampling.row_uniforms(8, torch.arange(200_000), 5))


# --------------------------------------------------------------------------- dtype, copy, cache

def test_sampling_dtype_copy_one_dtype_cache_and_refresh(monkeypatch):
    """bf16 autocast around a float32 model: bf16 copy of the weights, K and V both bf16, float32
    log-probs; the copy follows the master weights after an update."""
    model = _model()
    caches = []
    real = decode_steps.make_cache
    monkeypatch.setattr("opdkit.rollout.sampler.make_cache", lambda *a: caches.append(real(*a)) or caches[-1])
    p = SamplingParams(max_new_tokens=8, samples_per_prompt=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _sample(model, p)
    layer = caches[-1].layers[0]
    assert layer._k.dtype == layer._v.dtype == torch.bfloat16
    assert a.logp_old_BT.dtype == torch.float32
    assert all(q.dtype == torch.float32 for q in model.parameters())  # the master is untouched
    ref_model = _model().to(torch.bfloat16)
    _same(a, _sample(ref_model, p), atol=3e-2)  # = sampling a bf16 model
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = _sample(model, p)
    with torch.no_grad():
        for q in ref_model.parameters():
            q.copy_(q.float() * 1.5)
    _same(b, _sample(ref_model, p), atol=3e-2)


# --------------------------------------------------------------------------- lean step check

def test_lean_step_checked_and_fallback_on_disagreement(monkeypatch):
    model = _model(5)
    p = SamplingParams(max_new_tokens=10, samples_per_prompt=2)
    used = []
    real_init = decode_steps.LeanStep.__init__
    monkeypatch.setattr(decode_steps.LeanStep, "__init__", lambda self, *a: used.append(1) or real_init(self, *a))
    good = _sample(model, p)
    assert used  # the lean step passed its check and sampled
    monkeypatch.setattr(decode_steps, "LEAN_MODEL_TYPES", ())
    generic = _sample(model, p)
    monkeypatch.undo()
    broken = _model(5)  # a fresh decoder: no cached verdict
    real_norm = decode_steps.LeanStep._norm
    monkeypatch.setattr(decode_steps.LeanStep, "_norm", staticmethod(lambda m, x: real_norm(m, x) * 1.01))
    with pytest.warns(UserWarning, match="disagrees"):
        fallback = _sample(broken, p)
    _same(fallback, generic)
    _same(good, generic)


def test_no_per_token_weight_casts():
    """Under bf16 autocast a float32 model is cast once per call (its sampling copy), not once per token:
    a warm call converts no weight-shaped tensor (2-D, >= 16 rows; the decode activations have 8 rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _model()
    p = SamplingParams(max_new_tokens=12, samples_per_prompt=2)  # 8 rows

    class CountCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            x = args[0]
            if (func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and x.dim() == 2
                    and x.shape[0] >= 16 and out.dtype != x.dtype):
                CountCasts.n += 1
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _sample(model, p)  # builds the bf16 copy
        with CountCasts():
            _sample(model, p)
    assert CountCasts.n == 0


def test_gradient_checkpointing_keeps_the_lean_step():
    """The trainer's gradient checkpointing adds an embedding hook; the lean step still applies."""
    model = _model(2)
    model.gradient_checkpointing_enable()
    assert decode_steps.lean_supported(model.config, model.get_decoder(), "preallocated")
    model.get_decoder().layers[0].register_forward_hook(lambda *a: None)  # any other hook: the model's forward
    assert not decode_steps.lean_supported(model.config, model.get_decoder(), "preallocated")


def test_top_p_filter_skips_a_failing_prefilter_with_the_same_thresholds(monkeypatch):
    """After a full-sort fallback the stateful filter sorts directly for a while: same thresholds."""
    calls = []
    real = token_sampling._filter_threshold
    monkeypatch.setattr(token_sampling, "_filter_threshold", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    f = token_sampling.TopPFilter(retry_every=4)
    for step in range(12):
        z = torch.randn(6, 1000, generator=g) * (0.05 if 3 <= step < 8 else 6.0)  # flat steps 3..7
        torch.testing.assert_close(f(z, 0, 0.9), _reference_threshold(z, 0.9), rtol=0, atol=0)
    assert len(calls) == 6  # prefilter at steps 0-3, 7, 11; 4-6 and 8-10 sorted directly after a fallback


def _reference_threshold(z, top_p):
    keep = _reference_keep(z, 0, top_p)
    return z.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
