"""Fused sparse matrix-vector kernels for decode (one token, memory-bound).

Weights are stored Wᵀ, one contiguous row per input channel. The kernel decides the mask
and accumulates only the active rows, so each active row is read once and inactive rows
are never touched; gather-then-matmul would move more bytes than the dense product.
Output columns are split in blocks across threads: each thread streams its slab of every
active row, which keeps both cores' prefetchers on contiguous runs.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency; the fallback only keeps import working on odd platforms
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

# Columns per thread block: a multiple of the SIMD width, small enough to balance 2-4 cores.
BLOCK = 192


def split_mask_numpy(x: np.ndarray, c: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(x⊙m, x⊙(1−m)) with m = |x⊙c| > t: the reference the kernel must equal."""
    m = np.abs(x * c) > t
    return np.where(m, x, 0).astype(np.float32), np.where(m, 0, x).astype(np.float32)


if HAVE_NUMBA:

    @njit(cache=True, fastmath=True, nogil=True)
    def _active(x, c, t, idx, rest):  # pragma: no cover - compiled
        n = 0
        for j in range(x.shape[0]):
            v = x[j]
            if abs(v * c[j]) > t:
                idx[n] = j
                n += 1
                rest[j] = 0.0
            else:
                rest[j] = v
        return n

    @njit(cache=True, fastmath=True, nogil=True)
    def _rows(x, wt, idx, n, out, lo, hi):  # pragma: no cover - compiled
        # Eight active rows per pass: the accumulator is loaded and stored once per eight
        # weight rows, so the loop stays bound by streaming the weights, not by out[].
        for o in range(lo, hi):
            out[o] = 0.0
        a = 0
        while a + 8 <= n:
            j0, j1, j2, j3 = idx[a], idx[a + 1], idx[a + 2], idx[a + 3]
            j4, j5, j6, j7 = idx[a + 4], idx[a + 5], idx[a + 6], idx[a + 7]
            x0, x1, x2, x3 = x[j0], x[j1], x[j2], x[j3]
            x4, x5, x6, x7 = x[j4], x[j5], x[j6], x[j7]
            for o in range(lo, hi):
                out[o] += (x0 * wt[j0, o] + x1 * wt[j1, o] + x2 * wt[j2, o] + x3 * wt[j3, o]) + (
                    x4 * wt[j4, o] + x5 * wt[j5, o] + x6 * wt[j6, o] + x7 * wt[j7, o])
            a += 8
        while a < n:
            j = idx[a]
            xj = x[j]
            for o in range(lo, hi):
                out[o] += xj * wt[j, o]
            a += 1

    @njit(cache=True, fastmath=True, nogil=True)
    def _rows_serial(x, wt, idx, n, out):  # pragma: no cover - compiled
        _rows(x, wt, idx, n, out, 0, wt.shape[1])

    @njit(cache=True, fastmath=True, parallel=True)
    def _rows_parallel(x, wt, idx, n, out):  # pragma: no cover - compiled
        n_out = wt.shape[1]
        n_blocks = (n_out + BLOCK - 1) // BLOCK
        for b in prange(n_blocks):
            _rows(x, wt, idx, n, out, b * BLOCK, min(n_out, (b + 1) * BLOCK))


def sparse_matvec(x: np.ndarray, wt: np.ndarray, c: np.ndarray, t: float,
                  parallel: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """y_sparse = Σ_{j: |x_j c_j| > t} x_j wt[j], plus x⊙(1−m) for the low-rank part.

    x (in,) float32, wt (in, out) float32 C-contiguous. Returns (y, rest, n_active).
    """
    idx = np.empty(x.shape[0], dtype=np.int32)
    rest = np.empty_like(x)
    out = np.empty(wt.shape[1], dtype=np.float32)
    if not HAVE_NUMBA:  # pragma: no cover
        xs, rest = split_mask_numpy(x, c, t)
        return xs @ wt, rest, int(np.count_nonzero(xs))
    n = _active(x, c, np.float32(t), idx, rest)
    (_rows_parallel if parallel else _rows_serial)(x, wt, idx, n, out)
    return out, rest, n


def set_threads(n: int | None) -> None:
    if HAVE_NUMBA and n:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
