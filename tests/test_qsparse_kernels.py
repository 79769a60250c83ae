"""Quantized rows: the formats against their definition, the numba kernels against a numpy
reference of the same quantized formula (mask, active rows, low-rank term) on random data."""

from __future__ import annotations

import numpy as np
import pytest

from edge.sparse import qkernels as K
from edge.sparse.qformat import Q4, Q8, dequantize_rows, quantize_rows
from edge.sparse.qstore import Layout, in_memory


def test_q8_matches_q8_0_rule() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 96)).astype(np.float32)
    w[1, :32] = 0  # an all-zero block: scale 0, values 0
    q, d = quantize_rows(w, Q8)
    assert q.dtype == np.int8 and q.shape == (5, 96) and d.shape == (5, 3)
    scale = d.view(np.float16).astype(np.float32)
    want = np.abs(w.reshape(5, 3, 32)).max(-1) / 127
    np.testing.assert_allclose(scale, want.astype(np.float16).astype(np.float32))
    back = dequantize_rows(q, d, Q8)
    # rounding to the nearest step: at most half a step (plus the f16 scale's rounding)
    assert np.all(np.abs(back - w).reshape(5, 3, 32) <= scale[..., None] * 0.51 + 1e-7)
    assert np.all(back[1, :32] == 0) and np.abs(q).max() <= 127


def test_q4_packs_like_q4_0() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    q, d = quantize_rows(w, Q4)
    assert q.dtype == np.uint8 and q.shape == (4, 32)  # two values per byte: 4.5 bits/weight
    scale = d.view(np.float16).astype(np.float32)
    blocks = w.reshape(4, 2, 32)
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(scale, (top / -8).astype(np.float16).astype(np.float32))
    # byte i of a block: value i in the low nibble, value i + 16 in the high one
    lo, hi = q[0, :16] & 15, q[0, :16] >> 4
    want = np.clip(np.floor(w[0, :32] / scale[0, 0] + 8.5), 0, 15)
    assert np.array_equal(lo, want[:16]) and np.array_equal(hi, want[16:])
    back = dequantize_rows(q, d, Q4)
    assert np.all(np.abs(back - w).reshape(4, 2, 32) <= np.abs(scale)[..., None] + 1e-6)


def test_padding_and_tiny_scales() -> None:
    w = np.full((2, 40), 1e-9, dtype=np.float32)  # 40 columns pad to 64; scale would be subnormal
    for fmt in (Q8, Q4):
        q, d = quantize_rows(w, fmt)
        s = d.view(np.float16)
        assert np.all(np.isfinite(s)) and np.all((s == 0) | (np.abs(s) >= np.float16(6.1035e-05)))
        assert dequantize_rows(q, d, fmt).shape == (2, 64)


def test_h2f_is_exact_on_normals_and_zero() -> None:
    from numba import njit

    @njit
    def widen(h, out):
        for i in range(h.shape[0]):
            out[i] = K.h2f(h[i])

    rng = np.random.default_rng(2)
    vals = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.integers(-4, 4, 1000), [0.0, -0.0, 65504.0, 6.1035e-05]])
    h = vals.astype(np.float16)
    out = np.empty(h.size, np.float32)
    widen(h.view(np.uint16), out)
    normal = (np.abs(h) >= np.float16(6.1035e-05)) | (h == 0)
    assert np.array_equal(out[normal], h[normal].astype(np.float32))


def _store(mats: dict[str, tuple[np.ndarray, object]], norms: dict[str, np.ndarray],
           scales: dict[str, np.ndarray] | None = None):
    scales = scales or {}
    lay = Layout()
    for n, (w, fmt) in mats.items():
        lay.rows(n, fmt, w.shape[0], w.shape[1], norms=n in norms, out_scales=n in scales)

    def fill(wr):
        for n, (w, fmt) in mats.items():
            q, d = quantize_rows(w, fmt)
            wr.rows(n, q, d, 0, norms.get(n))
            if n in scales:
                wr.out_scales(n, scales[n])

    return in_memory(lay, {}, fill)


def _deq(store, name):
    q, d, fmt = store.matrix(name)
    return dequantize_rows(q, d, fmt)


@pytest.mark.parametrize("fmt", [Q8, Q4], ids=["q8", "q4"])
@pytest.mark.parametrize("inactive", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("rank", [0, 40])
def test_group_kernel_equals_numpy_formula(fmt, inactive: float, rank: int) -> None:
    """y = ((x⊙m) Ŵ + ((x⊙(1−m)) Â) B̂) ⊙ s with Ŵ, Â, B̂ the dequantized rows, m = |x⊙c| > t,
    s the per-output scales ("k" has them, spanning 1e-3..1e2; the others have none)."""
    rng = np.random.default_rng(int(inactive * 10) + rank)
    shapes = {"q": (200, 160), "k": (200, 64), "v": (200, 96)}  # 200 rows: a 4-row tail too
    mats = {n: (rng.standard_normal(s).astype(np.float32) * 0.1, fmt) for n, s in shapes.items()}
    norms = {n: np.sqrt((w * w).sum(1)).astype(np.float32) for n, (w, _) in mats.items()}
    lr = {}
    if rank:
        for n, (n_in, n_out) in shapes.items():
            lr[n + ".a"] = (rng.standard_normal((n_in, rank)).astype(np.float32) * 0.1, Q8)
            lr[n + ".b"] = (rng.standard_normal((rank, n_out)).astype(np.float32), Q8)
    out_s = {"k": (10.0 ** rng.uniform(-3, 2, 64)).astype(np.float32)}
    st = _store(mats, norms, out_s)
    lst = _store(lr or {"none": (np.zeros((1, 32), np.float32), Q8)}, {})
    x = rng.standard_normal(200).astype(np.float32)
    G = len(shapes)
    ids = np.array([st.ids[n] for n in shapes], np.int64)
    xs = np.tile(x, (G, 1))
    acts = np.zeros((G, 200), np.int32)
    inacts = np.zeros((G, 200), np.int32)
    n_act = np.zeros(G, np.int64)
    zs = np.zeros((G, 64), np.float32)
    b_ids = np.full(G, -1, np.int64)
    ranks = np.zeros(G, np.int64)
    want = []
    rows_only = []  # each module's active rows alone (what wide_matvec computes)
    for g, n in enumerate(shapes):
        score = np.abs(x * norms[n])
        t = float(np.quantile(score, inactive)) if inactive else -1.0
        na, ni = K.select(x, st.f32, st.mats[ids[g], K.COFF], np.float32(t), 200, acts[g], inacts[g])
        m = score > t if t >= 0 else np.ones(200, bool)
        assert na == m.sum() and ni == 200 - na
        assert np.array_equal(np.sort(acts[g, :na]), np.flatnonzero(m))
        n_act[g] = na
        y = np.where(m, x, 0) @ _deq(st, n)
        rows_only.append(y[: shapes[n][1]] * out_s.get(n, 1.0))
        if rank:
            a_id, b_id = lst.ids[n + ".a"], lst.ids[n + ".b"]
            K.lowrank_z(lst.u8, lst.i8, lst.u16, lst.mats[a_id], x, inacts[g], ni, zs[g])
            z_ref = np.where(m, 0, x) @ _deq(lst, n + ".a")
            np.testing.assert_allclose(zs[g], z_ref, rtol=1e-4, atol=1e-4)
            b_ids[g], ranks[g] = b_id, rank
            y = y + z_ref[:rank] @ _deq(lst, n + ".b")[:, : shapes[n][1]]
        want.append(y[: shapes[n][1]] * out_s.get(n, 1.0))
    outs = np.full((G, 160), np.nan, np.float32)  # the kernel must overwrite, not accumulate
    iota = np.arange(64, dtype=np.int32)
    for P in (1, 2, 3):  # each thread sweeps its share of the rows; the shares are summed
        acc = np.full((P, G, 160), np.nan, np.float32)
        K.group_matvec(st.u8, st.i8, st.u16, st.f32, st.mats, ids, xs, acts, n_act, outs,
                       lst.u8, lst.i8, lst.u16, lst.mats, b_ids, zs, ranks, iota, acc, P)
        for g, n in enumerate(shapes):
            got = outs[g, : shapes[n][1]]
            tol = 2e-5 * np.abs(want[g] / out_s.get(n, 1.0)).max() * out_s.get(n, 1.0)  # per output
            assert np.all(np.abs(got - want[g]) <= tol), (n, float(np.max(np.abs(got - want[g]) / tol)))
    for g in (0, 1):  # without and with output scales
        wide = np.full(160, np.nan, np.float32)
        K.wide_matvec(st.u8, st.i8, st.u16, st.f32, st.mats[ids[g]], x, acts[g], n_act[g], wide, 2)
        n_out = rows_only[g].shape[0]
        np.testing.assert_allclose(wide[:n_out], rows_only[g], rtol=0, atol=2e-5 * np.abs(rows_only[g]).max())


def test_dequant_rows_kernel_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    for fmt in (Q8, Q4):
        w = rng.standard_normal((10, 96)).astype(np.float32)
        st = _store({"w": (w, fmt)}, {})
        out = np.zeros((4, 64), np.float32)
        K.dequant_rows(st.u8, st.i8, st.u16, st.mats[0], 3, 7, 1, 3, out)
        assert np.array_equal(out, _deq(st, "w")[3:7, 32:96])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("fmt", [Q8, Q4])
def test_c_row_quantizer_equals_numpy(fmt, transposed: bool) -> None:
    """The C quantizer that builds the stores (edge_quantize) writes the same bytes as the
    numpy reference (qformat.quantize_rows), reading Wᵀ's rows straight out of W."""
    from edge.sparse import qnative
    from edge.sparse.qformat import padded

    lib = qnative.library(required=True)
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((70, 45)) * rng.uniform(1e-3, 3, (70, 1))).astype(np.float32)
    w[3, :] = 0  # all-zero blocks: scale 0
    w[5, :] = 1e-9  # scales that would be subnormal
    a = np.ascontiguousarray(w.T) if transposed else w  # the rows to quantize
    n_rows, n_cols = a.shape
    q, d = quantize_rows(a, fmt)
    nb = padded(n_cols) // 32
    rb = fmt.row_bytes(padded(n_cols))
    stride = rb + 2 * nb + 6  # a gap after the scales, as a store could have
    buf = np.zeros(n_rows * stride, np.uint8)
    norms = np.zeros(n_rows, np.float32)
    err = np.zeros(2)
    rs, cs = (1, w.shape[1]) if transposed else (w.shape[1], 1)
    lib.edge_quantize(w.ctypes.data, rs, cs, n_rows, n_cols, fmt.code, nb, rb, stride, buf.ctypes.data,
                      norms.ctypes.data, err.ctypes.data, 2)
    rows = buf.reshape(n_rows, stride)
    assert np.array_equal(rows[:, :rb], q.view(np.uint8).reshape(n_rows, rb))
    assert np.array_equal(rows[:, rb : rb + 2 * nb].copy().view(np.uint16), d)
    np.testing.assert_allclose(norms, np.linalg.norm(a.astype(np.float64), axis=1), rtol=1e-5)
    back = dequantize_rows(q, d, fmt)[:, :n_cols]
    np.testing.assert_allclose(err, [np.sum((back - a) ** 2.0), np.sum(a.astype(np.float64) ** 2)], rtol=1e-5)


@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"], ids=["pi4", "pi5"])
def test_c_kernels_build_for_a_pi(cpu: str, tmp_path) -> None:
    """The decode kernels are portable C (no x86 intrinsics): they compile for a Pi 4 and a
    Pi 5 with the flags edge uses there, and the q4 sum becomes NEON vector conversions
    (scvtf on .4s lanes), not one scalar conversion per weight."""
    import shutil
    import subprocess

    from edge.sparse import qnative

    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu; .ci/run does)")
    out = tmp_path / "qk.so"
    r = subprocess.run([cc, *qnative.BASE_FLAGS, f"-mcpu={cpu}", "-fopenmp", "-o", str(out), str(qnative.SOURCE), "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dump = subprocess.run([cc.replace("gcc", "objdump"), "-d", str(out)], capture_output=True, text=True).stdout
    accum = dump[dump.index("<accum>:"):]
    accum = accum[: accum.index("\n\n")]
    assert "scvtf\tv" in accum and "edge_decode" in dump
