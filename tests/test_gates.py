"""Tests for segmenters, the drift gate (docs/methods.md §4) and the sign-consistency gate (§5.1).

References are independent float64 Python loops over rows / positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from opdkit.gates.drift import (
    GATE_NORMALIZATIONS,
    drift_gate,
    drift_stats,
    get_gate_normalization,
    normalize_gate,
    segment_scores,
)
from opdkit.gates.segments import block_segments, newline_segments, sequence_segments, token_segments
from opdkit.gates.sign import sign_agreement, sign_consistency_advantage, verifier_advantage

NL = 0  # newline token id in hand-made rows


# ----------------------------------------------------------------------------- helpers / references
def _random_batch(seed: int, B: int = 6, T: int = 40):
    """Random logp / logp_old / mask with padded rows, a hole, and an all-padding row."""
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = logp_old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # full row
    lengths[1] = 0  # all padding
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
    if T > 5 and lengths[2] > 5:
        mask[2, 3] = 0.0  # a hole (e.g. a masked special token)
    return logp.float(), logp_old.float(), mask


def _ref_gate(logp, logp_old, mask, seg, tau, statistic="signed_mean"):
    """Float64 Python-loop reference of §4 steps 1-4 (``abs_mean``: the block mean of |δ|, §8)."""
    B, T = mask.shape
    d = (logp.double() - logp_old.double()).tolist()
    m, s = mask.tolist(), seg.tolist()
    members: dict[int, list[tuple[int, int]]] = {}
    for b in range(B):
        for t in range(T):
            if m[b][t] != 0:
                members.setdefault(s[b][t], []).append((b, t))
    out = [[0.0] * T for _ in range(B)]
    for toks in members.values():
        f = abs if statistic == "abs_mean" else (lambda x: x)
        mean = sum(f(d[b][t]) for b, t in toks) / len(toks)
        for b, t in toks:
            out[b][t] = math.exp(-tau * abs(mean))
    return torch.tensor(out, dtype=torch.float64)


def _ref_newline(ids_row, mask_row, nl_set, min_len, max_len, fallback):
    """Per-row Python reference of NewlineSpan: local segment index per position, -1 when invalid."""
    T = len(ids_row)
    valid = [mask_row[t] != 0 for t in range(T)]
    if not any(valid):
        return [-1] * T
    L = max(t for t in range(T) if valid[t]) + 1
    if not any(valid[t] and ids_row[t] in nl_set for t in range(T)):
        return [t // fallback if valid[t] else -1 for t in range(T)]
    cuts = [t + 1 for t in range(L) if valid[t] and ids_row[t] in nl_set and t + 1 < L]
    bounds = [0] + cuts + [L]
    merged, cur = [], 0
    for e in bounds[1:]:
        if e - cur >= min_len:
            merged.append((cur, e))
            cur = e
    if cur < L:  # short tail: merge into the previous span (or the whole row is one span)
        merged = merged[:-1] + [(merged[-1][0] if merged else 0, L)]
    local, j = [-1] * T, 0
    for s, e in merged:
        n = e - s
        P = -(-n // max_len)
        edges = [s + math.ceil(p * n / P) for p in range(P + 1)]
        for p in range(P):
            for t in range(edges[p], edges[p + 1]):
                local[t] = j
            j += 1
    return [local[t] if valid[t] else -1 for t in range(T)]


def _global(local_rows, T):
    return torch.tensor([[(b * T + x) if x >= 0 else -1 for x in row] for b, row in enumerate(local_rows)])


def _assert_no_collision(seg, mask):
    rows = [set(seg[b][mask[b] != 0].tolist()) for b in range(seg.shape[0])]
    for b in range(len(rows)):
        for c in range(b + 1, len(rows)):
            assert not (rows[b] & rows[c])


# ----------------------------------------------------------------------------- segments
def test_block_segments_partial_last_block_and_padding():
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [0] * 10])
    seg = block_segments(mask, 4)
    assert seg.dtype == torch.int64
    assert seg[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert seg[1].tolist() == [10, 10, 10, 10, 11, 11, -1, -1, -1, -1]
    assert seg[2].tolist() == [-1] * 10
    assert token_segments(mask)[1].tolist() == [10, 11, 12, 13, 14, 15, -1, -1, -1, -1]
    assert sequence_segments(mask)[0].tolist() == [0] * 10
    assert sequence_segments(mask)[1].tolist() == [10] * 6 + [-1] * 4
    with pytest.raises(ValueError):
        block_segments(mask, 0)


def test_newline_merge_and_split_by_hand():
    ids = torch.tensor([[1, NL, 2, 3, NL, 4, 5, 6, NL, 7]])
    mask = torch.ones_like(ids)
    # raw spans 2,3,4,1 -> [2+3] (merge into next), [4] kept, tail [1] merges into previous -> 5,5
    seg = newline_segments(ids, mask, [NL], min_len=3, max_len=5, fallback=64)
    assert seg[0].tolist() == [0] * 5 + [1] * 5
    # same spans, max_len=4: each 5-span splits into ceil(5/4)=2 parts of sizes 3,2
    seg = newline_segments(ids, mask, [NL], min_len=3, max_len=4, fallback=64)
    assert seg[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    # no merging: cut after every newline
    seg = newline_segments(ids, mask, [NL], min_len=1, max_len=128, fallback=64)
    assert seg[0].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3]
    # everything shorter than min_len: one span
    seg = newline_segments(ids, mask, [NL], min_len=11, max_len=128, fallback=64)
    assert seg[0].tolist() == [0] * 10


def test_newline_split_equal_parts_fallback_and_padding():
    ids = torch.tensor([[NL] + [5] * 9, [5] * 10, [5, 5, NL, 5, 5, 5, 0, 0, 0, 0], [NL] * 10])
    mask = torch.tensor([[1] * 10, [1] * 10, [1] * 6 + [0] * 4, [0] * 10])
    seg = newline_segments(ids, mask, [NL], min_len=1, max_len=4, fallback=4)
    assert seg[0].tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # 1 + (9 -> 3,3,3)
    assert seg[1].tolist() == [10, 10, 10, 10, 11, 11, 11, 11, 12, 12]  # no newline: Block-4
    # row 2: the NL at position 6 is padding and does not cut; real cut after position 2
    assert seg[2].tolist() == [20, 20, 20, 21, 21, 21, -1, -1, -1, -1]
    assert seg[3].tolist() == [-1] * 10
    # a newline that is the last valid token is the row end, not a cut
    ids2 = torch.tensor([[5, 5, 5, NL, 9]])
    seg2 = newline_segments(ids2, torch.tensor([[1, 1, 1, 1, 0]]), [NL], min_len=1, max_len=8)
    assert seg2[0].tolist() == [0, 0, 0, 0, -1]


@pytest.mark.parametrize("seed", range(4))
def test_newline_matches_reference_random(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, T = 7, 50
    ids = torch.randint(0, 12, (B, T), generator=g)
    ids[3] = torch.randint(3, 12, (T,), generator=g)  # no newline: fallback
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    mask[0, torch.randint(0, T, (4,), generator=g)] = 0  # holes
    nl = [0, 1, 2] if seed % 2 else [0]
    for min_len in (0, 1, 3, 6, 16):
        for max_len in (1, 2, 5, 9, 128):
            for fallback in (1, 7, 64):
                seg = newline_segments(ids, mask, nl, min_len=min_len, max_len=max_len, fallback=fallback)
                ref = _global([_ref_newline(ids[b].tolist(), mask[b].tolist(), set(nl), min_len, max_len,
                                            fallback) for b in range(B)], T)
                assert torch.equal(seg, ref), (min_len, max_len, fallback)
                _assert_no_collision(seg, mask)


def test_segment_ids_never_collide_across_rows():
    _, _, mask = _random_batch(0, B=5, T=30)
    ids = torch.randint(0, 4, mask.shape, generator=torch.Generator().manual_seed(1))
    for seg in (block_segments(mask, 7), token_segments(mask), sequence_segments(mask),
                newline_segments(ids, mask, [0], min_len=2, max_len=5)):
        _assert_no_collision(seg, mask)
        assert bool(((seg >= 0) == (mask != 0)).all())


# ----------------------------------------------------------------------------- drift gate
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_drift_gate_matches_reference(seed, tau):
    logp, logp_old, mask = _random_batch(seed)
    ids = torch.randint(0, 5, mask.shape, generator=torch.Generator().manual_seed(seed))
    for seg in (block_segments(mask, 4), block_segments(mask, 64), token_segments(mask),
                sequence_segments(mask), newline_segments(ids, mask, [0], min_len=3, max_len=6)):
        gate = drift_gate(logp, logp_old, mask, seg, tau=tau)
        assert gate.dtype == torch.float32
        torch.testing.assert_close(gate.double(), _ref_gate(logp, logp_old, mask, seg, tau),
                                   rtol=1e-6, atol=1e-6)
        assert bool((gate[mask == 0] == 0).all())
        assert bool((gate[1] == 0).all())  # all-padding row


def test_gate_exactly_one_without_drift_and_token_sequence_controls():
    logp, logp_old, mask = _random_batch(7)
    for seg in (block_segments(mask, 4), token_segments(mask), sequence_segments(mask)):
        gate = drift_gate(logp_old.clone(), logp_old, mask, seg)
        assert bool((gate[mask != 0] == 1.0).all()) and bool((gate[mask == 0] == 0.0).all())
    tau = 0.7
    g_tok = drift_gate(logp, logp_old, mask, token_segments(mask), tau=tau)
    assert torch.equal(g_tok, drift_gate(logp, logp_old, mask, block_segments(mask, 1), tau=tau))
    d = (logp.double() - logp_old.double())
    torch.testing.assert_close(g_tok.double(), torch.exp(-tau * d.abs()) * (mask != 0), rtol=1e-6, atol=1e-6)
    g_seq = drift_gate(logp, logp_old, mask, sequence_segments(mask), tau=tau)
    for b in range(mask.shape[0]):
        v = mask[b] != 0
        if v.any():
            expect = math.exp(-tau * abs(d[b][v].mean().item()))
            torch.testing.assert_close(g_seq[b][v].double(), torch.full((int(v.sum()),), expect,
                                       dtype=torch.float64), rtol=1e-6, atol=1e-6)
    s = segment_scores(logp, logp_old, mask, sequence_segments(mask))
    torch.testing.assert_close(s[0].double(), torch.full((mask.shape[1],), d[0].mean().item(),
                               dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_abs_mean_gate_matches_reference(seed, tau):
    logp, logp_old, mask = _random_batch(seed)
    ids = torch.randint(0, 5, mask.shape, generator=torch.Generator().manual_seed(seed))
    for seg in (block_segments(mask, 4), token_segments(mask), sequence_segments(mask),
                newline_segments(ids, mask, [0], min_len=3, max_len=6)):
        gate = drift_gate(logp, logp_old, mask, seg, tau=tau, statistic="abs_mean")
        torch.testing.assert_close(gate.double(), _ref_gate(logp, logp_old, mask, seg, tau, "abs_mean"),
                                   rtol=1e-6, atol=1e-6)
        assert bool((gate[mask == 0] == 0).all()) and not gate.requires_grad
    # every valid token of a block sees at least as small a gate as with the signed mean (|mean| <= mean |.|)
    seg = block_segments(mask, 4)
    signed = drift_gate(logp, logp_old, mask, seg, tau=tau)
    absm = drift_gate(logp, logp_old, mask, seg, tau=tau, statistic="abs_mean")
    assert bool((absm <= signed + 1e-7).all())


def test_abs_mean_does_not_cancel_opposite_drifts():
    """A block whose drifts cancel: the signed mean gives gate 1, the |δ| mean does not (§8)."""
    logp_old = torch.zeros(1, 4)
    logp = torch.tensor([[0.5, -0.5, 0.2, -0.2]])
    mask = torch.ones(1, 4)
    seg = block_segments(mask, 2)
    assert torch.equal(drift_gate(logp, logp_old, mask, seg), torch.ones(1, 4))
    expect = torch.tensor([[math.exp(-0.5)] * 2 + [math.exp(-0.2)] * 2], dtype=torch.float64)
    torch.testing.assert_close(drift_gate(logp, logp_old, mask, seg, statistic="abs_mean").double(), expect,
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="signed_mean, abs_mean"):
        drift_gate(logp, logp_old, mask, seg, statistic="median")


def test_gate_normalization_registry():
    """batch: the reduction's step-batch weighted denominator; sequence: per-row; none: neither (§8)."""
    assert set(GATE_NORMALIZATIONS) == {"batch", "sequence", "none"}
    assert GATE_NORMALIZATIONS["batch"].step_batch and not GATE_NORMALIZATIONS["batch"].per_sequence
    assert GATE_NORMALIZATIONS["sequence"].per_sequence and not GATE_NORMALIZATIONS["sequence"].step_batch
    none = GATE_NORMALIZATIONS["none"]
    assert not none.per_sequence and not none.step_batch
    with pytest.raises(ValueError, match="batch, sequence, none"):
        get_gate_normalization("global")


def test_partial_last_block_gate():
    logp_old = torch.zeros(1, 10)
    logp = torch.tensor([[0.1, 0.1, 0.1, 0.1, -0.2, 0.2, 0.0, 0.0, 0.3, -0.9]])
    mask = torch.ones(1, 10)
    gate = drift_gate(logp, logp_old, mask, block_segments(mask, 4))
    expect = [math.exp(-0.1)] * 4 + [1.0] * 4 + [math.exp(-0.3)] * 2
    torch.testing.assert_close(gate[0].double(), torch.tensor(expect, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_gate_has_no_gradient():
    logp, logp_old, mask = _random_batch(3)
    logp = logp.clone().requires_grad_(True)
    gate = drift_gate(logp, logp_old, mask, block_segments(mask, 4))
    assert not gate.requires_grad
    (gate * logp * mask).sum().backward()
    assert torch.equal(logp.grad, gate * mask)  # no gate terms in the gradient
    ng = normalize_gate(gate, mask, scope="batch")
    assert not ng.requires_grad


def test_segment_id_negative_on_valid_token_raises():
    logp, logp_old, mask = _random_batch(0)
    seg = block_segments(mask, 4)
    seg[0, 0] = -1
    with pytest.raises(ValueError):
        drift_gate(logp, logp_old, mask, seg)


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_normalize_gate_unit_mean(scope):
    logp, logp_old, mask = _random_batch(5)
    gate = drift_gate(logp, logp_old, mask, block_segments(mask, 4)).clone()
    gate[mask == 0] = 5.0  # garbage at padding must be ignored
    ng = normalize_gate(gate, mask, scope=scope)
    v = mask != 0
    assert bool((ng[~v] == 0).all())
    assert bool((ng[1] == 0).all())
    if scope == "sequence":
        for b in range(mask.shape[0]):
            if v[b].any():
                assert abs(ng[b][v[b]].double().mean().item() - 1.0) < 1e-6
                ratio = ng[b][v[b]] / gate[b][v[b]]
                torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    else:
        assert abs(ng[v].double().mean().item() - 1.0) < 1e-6
        ratio = ng[v] / gate[v]
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    assert torch.equal(normalize_gate(torch.zeros(2, 3), torch.zeros(2, 3), scope=scope), torch.zeros(2, 3))


def test_normalize_gate_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        normalize_gate(torch.ones(1, 2), torch.ones(1, 2), scope="step")


def test_drift_stats_sums():
    logp, logp_old, mask = _random_batch(2)
    gate = drift_gate(logp, logp_old, mask, block_segments(mask, 4))
    st = drift_stats(logp, logp_old, mask, gate)
    ad, n, gs, gq, gmin, gmax = 0.0, 0, 0.0, 0.0, math.inf, -math.inf
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] != 0:
                g = float(gate[b, t])
                ad += abs(float(logp[b, t]) - float(logp_old[b, t]))
                n, gs, gq, gmin, gmax = n + 1, gs + g, gq + g * g, min(gmin, g), max(gmax, g)
    assert int(st["token_count"]) == n
    assert abs(float(st["abs_drift_sum"]) - ad) < 1e-4
    assert abs(float(st["gate_sum"]) - gs) < 1e-6 and abs(float(st["gate_sq_sum"]) - gq) < 1e-6
    assert float(st["gate_min"]) == gmin and float(st["gate_max"]) == gmax
    empty = drift_stats(logp, logp_old, torch.zeros_like(mask), gate)
    assert float(empty["gate_min"]) == math.inf and float(empty["gate_max"]) == -math.inf
    assert int(empty["token_count"]) == 0


# ----------------------------------------------------------------------------- sign gate (§5.1)
def test_sign_gate_identity_at_lam1_beta0():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, 9, generator=g)
    adv[0, :3] = 0.0
    reward = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(6, 9)
    mask[2, 5:] = 0
    out = sign_consistency_advantage(adv, reward, groups, mask, lam=1.0, beta=0.0)
    assert torch.equal(out, adv * mask)


def test_sign_gate_cases_by_hand_two_groups():
    # groups (non-contiguous ids): {7: rows 0,2} rewards 1,0 -> mean .5; {3: rows 1,3} rewards 1,1 -> mean 1
    reward = torch.tensor([1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([7, 3, 7, 3])
    adv = torch.tensor([[0.4, -0.2, 0.0],
                        [0.5, -1.0, 0.3],
                        [-0.6, 0.8, 0.1],
                        [0.0, 2.0, -0.4]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    lam, beta = 2.0, 0.25
    av = [0.5, 0.0, -0.5, 0.0]
    torch.testing.assert_close(verifier_advantage(reward, groups), torch.tensor(av))

    def dis(a, i):
        return (1 - beta) * a + beta * av[i]

    expect = torch.tensor([[lam * 0.4, dis(-0.2, 0), dis(0.0, 0)],   # R=1: + agrees, - and 0 disagree
                           [lam * 0.5, dis(-1.0, 1), 0.0],           # masked position -> 0
                           [lam * -0.6, dis(0.8, 2), dis(0.1, 2)],   # R=0: - agrees
                           [dis(0.0, 3), lam * 2.0, dis(-0.4, 3)]])
    out = sign_consistency_advantage(adv, reward, groups, mask, lam=lam, beta=beta)
    torch.testing.assert_close(out, expect)
    agree = sign_agreement(adv, reward, mask)
    assert agree.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]]
    # baseline "none": A^V = R
    out_none = sign_consistency_advantage(adv, reward, groups, mask, lam=lam, beta=1.0, baseline="none")
    assert out_none[2, 1].item() == 0.0 and out_none[0, 1].item() == 1.0
    assert abs(out_none[0, 0].item() - lam * 0.4) < 1e-7
    with pytest.raises(ValueError, match="baseline"):
        sign_consistency_advantage(adv, reward, groups, mask, baseline="mean")


def test_sign_gate_default_constants_and_detached():
    adv = torch.tensor([[0.5, -0.5]], requires_grad=True)
    out = sign_consistency_advantage(adv, torch.tensor([1.0]), torch.tensor([0]), torch.ones(1, 2))
    assert not out.requires_grad
    # λ = 1.8 on agree; β = 1 on disagree -> A^V = 1 − 1 = 0 (single-sample group)
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.0]]))


def test_newline_long_chain_of_cuts():
    T = 301  # 300 cuts: exercises every pointer-doubling round
    ids = torch.full((2, T), NL)
    mask = torch.ones(2, T)
    seg = newline_segments(ids, mask, [NL], min_len=1, max_len=128)
    assert torch.equal(seg, torch.arange(2 * T).reshape(2, T))
    seg = newline_segments(ids, mask, [NL], min_len=3, max_len=128)
    local = [t // 3 for t in range(T)]
    local[-1] = local[-2]  # 301 = 100·3 + 1: the 1-token tail merges into the previous span
    assert seg[0].tolist() == local and seg[1].tolist() == [T + x for x in local]
