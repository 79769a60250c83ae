"""numba kernels over block-quantized rows (edge.sparse.qformat) kept in one flat buffer.

Every matrix of a model lives in one memory-mapped buffer; the kernels see it through three
views of the same bytes (uint8, int8, uint16) and a row of the matrix table
`mats[id] = (fmt, n_rows, n_cols, off, stride, row_bytes, n_blocks, c_off, s_off)`. Row j starts at
byte off + j·stride: its values, then its float16 scales, so a row is one contiguous run
(a skipped channel skips one run; small rows such as k/v's are not split in two streams).
c_off indexes the float32 view (channel norms of the R-Sparse mask), s_off too (per-output
scales that a finished output is multiplied by; -1 when the matrix has none).

`accum` is the core: out[cols] += Σ_a x[idx[a]] · row(idx[a])[cols], four rows per sweep
(the accumulator is loaded and stored once per four weight rows), each row read once,
front to back. Measured on this machine: sweeping whole rows streams 1.5× faster than
cutting them into L1-sized column tiles, and unsigned offsets matter (numba wraps negative
indices, and that check on a signed index keeps LLVM from vectorizing: 0.6 vs 4 GB/s).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from edge.sparse.qstore import COFF, FMT, NBLK, NROWS, OFF, ROWB, SOFF, STRIDE  # noqa: F401

PREFETCH = True
AHEAD = 8  # rows ahead: measured 4 < 8 ≈ 12 on the bundled model


@intrinsic
def _bits_to_f32(typingctx, u):  # pragma: no cover - compiled
    """Reinterpret a uint32 as float32 (an LLVM bitcast: portable, no float16 hardware)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _nibble(shift: bool):
    """float32 of a byte's low (or high) nibble, in 32-bit lanes: numba would widen `v & 15`
    to int64, and AVX2 has no vector int64 → float conversion (1.4× slower measured)."""

    @intrinsic
    def nib(typingctx, v):  # pragma: no cover - compiled
        sig = types.float32(types.uint8)

        def codegen(context, builder, signature, args):
            w = builder.zext(args[0], ir.IntType(32))
            w = builder.lshr(w, ir.Constant(ir.IntType(32), 4)) if shift else builder.and_(w, ir.Constant(ir.IntType(32), 15))
            return builder.sitofp(w, ir.FloatType())

        return sig, codegen

    return nib


_lo = _nibble(False)
_hi = _nibble(True)


@intrinsic
def _prefetch(typingctx, arr, i):  # pragma: no cover - compiled
    """llvm.prefetch of arr[i] for reading (PREFETCHT0 on x86, PRFM on ARM: portable)."""
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]],
                                       wraparound=False, boundscheck=False)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, ir.IntType(8).as_pointer()), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def h2f(h):  # pragma: no cover - compiled
    """float16 bits → float32 for zero and normal values (qformat never stores others)."""
    u = np.uint32(h)
    em = u & np.uint32(0x7FFF)
    if em == 0:
        return np.float32(0.0)
    # rebias the exponent (127 − 15 = 112) and widen the mantissa by 13 bits
    return _bits_to_f32(((u & np.uint32(0x8000)) << np.uint32(16)) | ((em << np.uint32(13)) + np.uint32(0x38000000)))


@njit(inline="always", cache=True)
def h2f_v(h):  # pragma: no cover - compiled
    """h2f without a branch, so LLVM vectorizes a row's worth of scales at once."""
    u = np.uint32(h)
    em = u & np.uint32(0x7FFF)
    bits = ((u & np.uint32(0x8000)) << np.uint32(16)) | ((em << np.uint32(13)) + np.uint32(0x38000000))
    return _bits_to_f32(bits & (np.uint32(0) - np.uint32(em != 0)))


@njit(inline="always", cache=True, fastmath=True)
def _coefs(u16, s, xj, nb, c, row):  # pragma: no cover - compiled
    """c[row, b] = x_j · scale_b for every block of one row: the per-block multipliers,
    converted in one vector loop instead of one scalar float16 widening per block."""
    for b in range(_u(nb)):
        c[row, b] = xj * h2f_v(u16[s + b])


@njit(inline="always", cache=True)
def _u(v):  # pragma: no cover - compiled
    return np.uint64(v)


@njit(inline="always", cache=True, fastmath=True)
def _q8_rows(i8, u16, off, stride, rb, x, idx, a0, a1, out, b0, b1, c):  # pragma: no cover
    a = a0
    while a + 4 <= a1:
        j0, j1, j2, j3 = idx[a], idx[a + 1], idx[a + 2], idx[a + 3]
        r0, r1, r2, r3 = _u(off + j0 * stride), _u(off + j1 * stride), _u(off + j2 * stride), _u(off + j3 * stride)
        an = min(a + AHEAD, a1 - 4)  # rows further on, fetched while these four are summed
        n0, n1 = _u(off + idx[an] * stride), _u(off + idx[an + 1] * stride)
        n2, n3 = _u(off + idx[an + 2] * stride), _u(off + idx[an + 3] * stride)
        _coefs(u16, (r0 + _u(rb)) >> _u(1), x[j0], b1, c, 0)
        _coefs(u16, (r1 + _u(rb)) >> _u(1), x[j1], b1, c, 1)
        _coefs(u16, (r2 + _u(rb)) >> _u(1), x[j2], b1, c, 2)
        _coefs(u16, (r3 + _u(rb)) >> _u(1), x[j3], b1, c, 3)
        for b in range(_u(b0), _u(b1)):
            c0, c1, c2, c3 = c[0, b], c[1, b], c[2, b], c[3, b]
            o = b * _u(32)
            if PREFETCH and (b & _u(1)) == 0:
                _prefetch(i8, n0 + o)
                _prefetch(i8, n1 + o)
                _prefetch(i8, n2 + o)
                _prefetch(i8, n3 + o)
            for i in range(_u(32)):
                out[o + i] += (c0 * np.float32(i8[r0 + o + i]) + c1 * np.float32(i8[r1 + o + i])) + (
                    c2 * np.float32(i8[r2 + o + i]) + c3 * np.float32(i8[r3 + o + i]))
        a += 4
    while a < a1:
        j = idx[a]
        r = _u(off + j * stride)
        _coefs(u16, (r + _u(rb)) >> _u(1), x[j], b1, c, 0)
        for b in range(_u(b0), _u(b1)):
            c0 = c[0, b]
            o = b * _u(32)
            for i in range(_u(32)):
                out[o + i] += c0 * np.float32(i8[r + o + i])
        a += 1


@njit(inline="always", cache=True, fastmath=True)
def _q4_rows(u8, u16, off, stride, rb, x, idx, a0, a1, out, b0, b1, c):  # pragma: no cover
    # value = (nibble − 8)·d: the −8 of four rows is folded into one per-block constant
    a = a0
    while a + 4 <= a1:
        j0, j1, j2, j3 = idx[a], idx[a + 1], idx[a + 2], idx[a + 3]
        r0, r1, r2, r3 = _u(off + j0 * stride), _u(off + j1 * stride), _u(off + j2 * stride), _u(off + j3 * stride)
        an = min(a + AHEAD, a1 - 4)
        n0, n1 = _u(off + idx[an] * stride), _u(off + idx[an + 1] * stride)
        n2, n3 = _u(off + idx[an + 2] * stride), _u(off + idx[an + 3] * stride)
        if PREFETCH:  # 16 bytes per block: fetch the next rows up front, a line at a time
            for p in range(_u(b0) * _u(16), _u(b1) * _u(16), _u(64)):
                _prefetch(u8, n0 + p)
                _prefetch(u8, n1 + p)
                _prefetch(u8, n2 + p)
                _prefetch(u8, n3 + p)
        _coefs(u16, (r0 + _u(rb)) >> _u(1), x[j0], b1, c, 0)
        _coefs(u16, (r1 + _u(rb)) >> _u(1), x[j1], b1, c, 1)
        _coefs(u16, (r2 + _u(rb)) >> _u(1), x[j2], b1, c, 2)
        _coefs(u16, (r3 + _u(rb)) >> _u(1), x[j3], b1, c, 3)
        for b in range(_u(b0), _u(b1)):
            c0, c1, c2, c3 = c[0, b], c[1, b], c[2, b], c[3, b]
            k = np.float32(-8.0) * ((c0 + c1) + (c2 + c3))
            o, p = b * _u(32), b * _u(16)
            for i in range(_u(16)):
                v0, v1, v2, v3 = u8[r0 + p + i], u8[r1 + p + i], u8[r2 + p + i], u8[r3 + p + i]
                out[o + i] += ((c0 * _lo(v0) + c1 * _lo(v1)) + (c2 * _lo(v2) + c3 * _lo(v3))) + k
                out[o + _u(16) + i] += ((c0 * _hi(v0) + c1 * _hi(v1)) + (c2 * _hi(v2) + c3 * _hi(v3))) + k
        a += 4
    while a < a1:
        j = idx[a]
        r = _u(off + j * stride)
        _coefs(u16, (r + _u(rb)) >> _u(1), x[j], b1, c, 0)
        for b in range(_u(b0), _u(b1)):
            c0 = c[0, b]
            k = np.float32(-8.0) * c0
            o, p = b * _u(32), b * _u(16)
            for i in range(_u(16)):
                v = u8[r + p + i]
                out[o + i] += c0 * _lo(v) + k
                out[o + _u(16) + i] += c0 * _hi(v) + k
        a += 1


@njit(cache=True, fastmath=True, nogil=True)
def accum(u8, i8, u16, mat, x, idx, a0, a1, out, b0, b1):  # pragma: no cover - compiled
    """out[32·b0 : 32·b1] += Σ_{a0 ≤ a < a1} x[idx[a]] · row idx[a] of matrix `mat`."""
    c = np.empty((4, b1), np.float32)  # per-block multipliers of the four rows in flight
    if mat[FMT] == 0:
        _q8_rows(i8, u16, mat[OFF], mat[STRIDE], mat[ROWB], x, idx, a0, a1, out, b0, b1, c)
    else:
        _q4_rows(u8, u16, mat[OFF], mat[STRIDE], mat[ROWB], x, idx, a0, a1, out, b0, b1, c)


@njit(cache=True, fastmath=True, nogil=True)
def select(x, f32, c_off, t, n_in, act, inact):  # pragma: no cover - compiled
    """R-Sparse's mask m = |x ⊙ c| > t: active channel ids to `act`, the others to
    `inact`; returns (n_active, n_inactive). t < 0 keeps every channel."""
    if t < 0:
        for j in range(n_in):
            act[j] = j
        return n_in, 0
    na = 0
    ni = 0
    for j in range(n_in):
        if abs(x[j] * f32[c_off + j]) > t:
            act[na] = j
            na += 1
        else:
            inact[ni] = j
            ni += 1
    return na, ni


@njit(cache=True, fastmath=True, nogil=True)
def dequant_rows(u8, i8, u16, mat, r0, r1, b0, b1, out):  # pragma: no cover - compiled
    """out[r − r0, c − 32·b0] = value of row r, column c, for r in [r0, r1), c in block range
    (out C-contiguous, (r1 − r0) × 32·(b1 − b0))."""
    fmt, off, stride, rb = mat[FMT], mat[OFF], mat[STRIDE], mat[ROWB]
    flat = out.reshape(-1)
    width = _u(32 * (b1 - b0))
    for r in range(r0, r1):
        rq = _u(off + r * stride)
        rs = (rq + _u(rb)) >> _u(1)
        w = _u(r - r0) * width
        for b in range(_u(b0), _u(b1)):
            d = h2f(u16[rs + b])
            o = w + (b - _u(b0)) * _u(32)
            if fmt == 0:
                for i in range(_u(32)):
                    flat[o + i] = d * np.float32(i8[rq + b * _u(32) + i])
            else:
                k = np.float32(-8.0) * d
                for i in range(_u(16)):
                    v = u8[rq + b * _u(16) + i]
                    flat[o + i] = d * _lo(v) + k
                    flat[o + _u(16) + i] = d * _hi(v) + k


@njit(cache=True, fastmath=True, nogil=True)
def lowrank_z(u8, i8, u16, amat, x, inact, ni, z):  # pragma: no cover - compiled
    """z = Σ over inactive channels of x_j · A[j] (A = V_r as rows): the low-rank input."""
    for i in range(z.shape[0]):
        z[i] = 0.0
    accum(u8, i8, u16, amat, x, inact, 0, ni, z, 0, amat[NBLK])


# ---- projections that share a parallel region ---------------------------------------
@njit(cache=True, fastmath=True, parallel=True)
def group_matvec(u8, i8, u16, f32, mats, ids, xs, acts, n_act, outs,
                 lu8, li8, lu16, lmats, lr_ids, zs, ranks, iota, acc, P):  # pragma: no cover
    """outs[g] = active rows of matrix ids[g] applied to xs[g] (+ z_g · B_g when
    lr_ids[g] ≥ 0), for every g, in one fork/join.

    Each of the P threads takes an equal share of every matrix's active rows (and of B's
    rows) and sweeps them whole into its own accumulator acc[p, g]; the shares are summed
    after. Rows stay contiguous streams, and the work is balanced whatever the active
    counts. P is numba.get_num_threads(), passed in (reading it here defeats the cache).
    """
    G = ids.shape[0]
    for p in prange(P):
        for g in range(G):
            m = mats[ids[g]]
            n_out = m[NBLK] * 32
            a = acc[p, g]
            for o in range(n_out):
                a[o] = 0.0
            n = n_act[g]
            accum(u8, i8, u16, m, xs[g], acts[g], n * p // P, n * (p + 1) // P, a, 0, m[NBLK])
            if lr_ids[g] >= 0:
                r = ranks[g]
                accum(lu8, li8, lu16, lmats[lr_ids[g]], zs[g], iota, r * p // P, r * (p + 1) // P, a, 0, m[NBLK])
    for g in range(G):
        n_out = mats[ids[g]][NBLK] * 32
        out = outs[g]
        for o in range(n_out):
            s = acc[0, g, o]
            for p in range(1, P):
                s += acc[p, g, o]
            out[o] = s
        _scale_out(f32, mats[ids[g]], out, 0, n_out)


@njit(inline="always", cache=True, fastmath=True)
def _scale_out(f32, mat, out, o0, o1):  # pragma: no cover - compiled
    """out[o] *= the matrix's per-output scale s_o, when it has scales."""
    so = mat[SOFF]
    if so >= 0:
        for o in range(o0, o1):
            out[o] *= f32[so + o]


@njit(cache=True, fastmath=True, parallel=True)
def wide_matvec(u8, i8, u16, f32, mat, x, idx, n, out, P):  # pragma: no cover - compiled
    """out = Σ_a x[idx[a]] · row idx[a], split by output blocks: for rows too long to give
    each thread a private accumulator (the output layer: one value per vocabulary entry)."""
    nb = mat[NBLK]
    for p in prange(P):
        b0, b1 = nb * p // P, nb * (p + 1) // P
        for o in range(b0 * 32, b1 * 32):
            out[o] = 0.0
        accum(u8, i8, u16, mat, x, idx, 0, n, out, b0, b1)
        _scale_out(f32, mat, out, b0 * 32, b1 * 32)
