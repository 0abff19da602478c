"""Tests for unbiased pass@k (docs/methods.md §7) against brute-force enumeration of k-subsets."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from opdkit.eval.passk import avg_at_n, mean_pass_at_k, pass_at_k, pass_at_k_array


def _brute(n: int, c: int, k: int) -> Fraction:
    """Exact fraction of k-subsets of n samples (first c correct) containing a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(i < c for i in s))
    return Fraction(hits, len(subsets))


def test_pass_at_k_equals_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ref = _brute(n, c, k)
                got = pass_at_k(n, c, k)
                assert abs(got - float(ref)) < 1e-12, (n, c, k, got, ref)
                if n - c < k:
                    assert got == 1.0
                if c == 0:
                    assert got == 0.0


def test_pass_at_k_known_values():
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))


def test_large_n_is_finite_and_exact():
    for n, c, k in ((200, 3, 100), (200, 1, 100), (200, 100, 100), (1000, 7, 500), (200, 0, 100)):
        p = pass_at_k(n, c, k)
        assert math.isfinite(p) and 0.0 <= p <= 1.0
        ref = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert abs(p - float(ref)) < 1e-12
    arr = pass_at_k_array([200, 200, 1000], [3, 150, 7], 100)
    assert bool(torch.isfinite(arr).all()) and bool(((arr >= 0) & (arr <= 1)).all())


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, 1, 5), (-1, 0, 1), (4, -1, 1), (4, 1, -1), (4, 1, 0),
                                   (0, 0, 1), (4.5, 1, 1), (4, 1, True)])
def test_invalid_input_raises(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_array_invalid_input_raises():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_array([8, 3], [1, 1], 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k_array([8, 3], [1, 4], 1)
    with pytest.raises(ValueError):
        pass_at_k_array([8, 3], [1, -1], 1)
    with pytest.raises(ValueError):
        pass_at_k_array([8, 3], [1.5, 1], 1)
    with pytest.raises(ValueError):
        pass_at_k_array([8, 3], [1, 1], 0)
    with pytest.raises(ValueError):
        mean_pass_at_k([], [], 1)
    with pytest.raises(ValueError):
        avg_at_n([0, 3], [0, 1])


def test_vectorized_equals_scalar():
    n_P, c_P = [], []
    for n in range(1, 13):
        for c in range(n + 1):
            n_P.append(n)
            c_P.append(c)
    for k in (1, 2, 5):
        keep = [i for i, n in enumerate(n_P) if n >= k]
        nn, cc = [n_P[i] for i in keep], [c_P[i] for i in keep]
        for n_in, c_in in ((nn, cc), (torch.tensor(nn), torch.tensor(cc))):
            arr = pass_at_k_array(n_in, c_in, k)
            assert arr.dtype == torch.float64 and arr.shape == (len(nn),)
            ref = torch.tensor([pass_at_k(n, c, k) for n, c in zip(nn, cc, strict=True)], dtype=torch.float64)
            assert torch.allclose(arr, ref, rtol=0, atol=1e-14)
            assert mean_pass_at_k(n_in, c_in, k) == pytest.approx(sum(ref.tolist()) / len(nn), abs=1e-14)
    # scalar n broadcasts over problems
    assert torch.allclose(pass_at_k_array(8, [0, 1, 8], 2),
                          torch.tensor([pass_at_k(8, c, 2) for c in (0, 1, 8)], dtype=torch.float64))


def test_avg_at_n():
    assert avg_at_n([8, 8, 4], [8, 2, 1]) == pytest.approx((1.0 + 0.25 + 0.25) / 3)
    assert avg_at_n(torch.tensor([32]), torch.tensor([0])) == 0.0
