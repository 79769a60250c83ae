"""Exactness of R-Sparse: s = 0 and α = 0 at full rank equal dense; the kernel equals numpy."""

from __future__ import annotations

import numpy as np
import pytest

from edge.sparse.kernel import HAVE_NUMBA, sparse_matvec, split_mask_numpy
from edge.sparse.rsparse import budget, sparse_linear_numpy
from edge.sparse.svd import channel_norms


def _mat(rng, n_in, n_out):
    return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 48), (96, 160)])
def test_s0_is_dense(shape):
    rng = np.random.default_rng(0)
    wt, x = _mat(rng, *shape), rng.standard_normal((5, shape[0])).astype(np.float32)
    y = sparse_linear_numpy(x, wt, channel_norms(wt), -1.0)
    np.testing.assert_array_equal(y, x @ wt)


@pytest.mark.parametrize("shape", [(64, 48), (96, 160)])
def test_alpha0_full_rank_is_dense(shape):
    rng = np.random.default_rng(1)
    wt, x = _mat(rng, *shape), rng.standard_normal((7, shape[0])).astype(np.float32)
    c = channel_norms(wt)
    t = float(np.quantile(np.abs(x * c), 0.6))  # 60% of channels go through the low-rank term
    v, s, ut = np.linalg.svd(wt, full_matrices=False)
    y = sparse_linear_numpy(x, wt, c, t, v.astype(np.float32), (s[:, None] * ut).astype(np.float32))
    np.testing.assert_allclose(y, x @ wt, rtol=0, atol=2e-5)
    # Truncating the rank must change the answer, or the test above proves nothing.
    r = min(shape) // 4
    y_r = sparse_linear_numpy(x, wt, c, t, v[:, :r].astype(np.float32),
                              (s[:r, None] * ut[:r]).astype(np.float32))
    assert np.abs(y_r - x @ wt).max() > 1e-2


def test_budget_matches_the_formula():
    # k = ⌊in(1−s)α⌋, r = ⌊(in·out(1−s) − k·out)/(in+out)⌋
    assert budget(576, 1536, 0.5, 1.0) == (288, 0)
    k, r = budget(576, 1536, 0.5, 0.9)
    assert k == int(576 * 0.5 * 0.9) == 259
    assert r == (442368 - 259 * 1536) // (576 + 1536) == 21
    assert budget(576, 576, 0.0, 1.0) == (576, 0)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("frac", [0.0, 0.5, 0.93])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (37, 13)])
def test_kernel_equals_numpy(shape, frac, parallel):
    rng = np.random.default_rng(hash((shape, frac)) % 2**32)
    wt = _mat(rng, *shape)
    x = rng.standard_normal(shape[0]).astype(np.float32)
    c = channel_norms(wt)
    t = float(np.quantile(np.abs(x * c), frac)) if frac else -1.0
    y, rest, n = sparse_matvec(x, wt, c, t, parallel=parallel)
    xs, xr = split_mask_numpy(x, c, t)
    assert n == np.count_nonzero(np.abs(x * c) > t)
    if frac:
        assert 0 < n < shape[0]
    np.testing.assert_array_equal(rest, xr)
    np.testing.assert_allclose(y, xs @ wt, rtol=1e-5, atol=1e-5)
