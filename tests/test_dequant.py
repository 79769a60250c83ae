"""Scoring on an f16 copy of a quantized model, and the batch layout each kernel needs.

The copy must hold the same weights (to f16 rounding) and give the same audit up to kernel
noise; the layout probe must keep shared-prefix scores close to the exact from-scratch ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from bias.audit import _sentence
from bias.scorer import LAYOUT_TOL, BatchScorer
from bias.suites import load_suite
from edge.dequant import resolve_compute
from tests.test_bias_suites import DATA


@pytest.fixture(scope="module")
def f16_path(bundled_model: Path) -> Path:
    return resolve_compute(bundled_model, "f16").path


def test_f16_copy_holds_the_same_weights(bundled_model: Path, f16_path: Path) -> None:
    src = {t.name: t for t in GGUFReader(bundled_model).tensors}
    copy = GGUFReader(f16_path).tensors
    assert len(copy) == len(src)
    worst = 0.0
    for t in copy:
        s = src[t.name]
        want = dequantize(s.data, s.tensor_type).astype(np.float64)
        got = np.asarray(t.data, np.float64).reshape(want.shape)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst <= 2.0**-11  # f16 rounding of each dequantized value, nothing more


def test_precision_choice_and_cache(bundled_model: Path, f16_path: Path) -> None:
    mtime = f16_path.stat().st_mtime_ns
    auto = resolve_compute(bundled_model)  # Q4_1, 135M parameters: small enough
    assert auto.precision == "f16" and auto.path == f16_path and auto.source_type == "Q4_1"
    assert f16_path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert resolve_compute(bundled_model, "file").path == bundled_model
    big = resolve_compute(bundled_model, auto_max_bytes=1 << 20)  # as if it were a 7B
    assert big.precision == "file" and big.path == bundled_model
    assert resolve_compute(f16_path, "f16").path == f16_path  # already f16: no copy of a copy


@pytest.mark.slow
def test_layout_and_f16_audit_agree_with_the_file(runtime, f16_path: Path) -> None:
    suite = load_suite(f"crows_pairs:{DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}", limit=30)
    reqs = [(_sentence(runtime, s)[0], 1) for it in suite.items for s in (it.more, it.less)]
    diffs = {}
    for name, mp in (("file", None), ("f16", f16_path)):
        with BatchScorer(runtime, model_path=mp) as sc:
            exact = np.array([x.sum() for x in sc.score(reqs, share_prefix=False)])
            fast = np.array([x.sum() for x in sc.score(reqs)])
            lay = sc.measure_layout()
            # the layout it chose keeps shared-prefix scores near the exact ones (sentence sums:
            # ≤ 0.3 nats on AVX2, 0.36 on AVX512's Q4_1 kernels; bugs cost whole nats)
            assert np.abs(fast - exact).max() < 0.45, name
            diffs[name] = exact[0::2] - exact[1::2]
            if name == "file":
                assert lay.max_shift > LAYOUT_TOL and lay.align == lay.period  # Q4_1 moves with the row
            else:
                assert lay.max_shift < LAYOUT_TOL and lay.align == 1  # f16 barely does
    # the same model: per-pair differences agree up to the Q4_1 kernel's 8-bit activations
    assert np.corrcoef(diffs["file"], diffs["f16"])[0, 1] > 0.99
    assert np.abs(diffs["file"] - diffs["f16"]).mean() < 0.35  # AVX2 0.2-0.3, AVX512 0.31


def test_no_room_for_the_copy_is_one_clear_error(bundled_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from edge.errors import EdgeError

    monkeypatch.setenv("EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(EdgeError, match="--precision file") as e:
        resolve_compute(bundled_model, "f16")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache").rglob("*.gguf"))  # nothing half-written


def test_a_changed_file_gets_its_own_copy(bundled_model: Path, tmp_path: Path) -> None:
    """Same size, same first 16 MiB (the fingerprint), other weights: no stale copy."""
    import os
    import shutil

    from edge.dequant import cache_path
    from edge.gguf_file import inspect

    a = tmp_path / "m.gguf"
    shutil.copyfile(bundled_model, a)
    before = cache_path(inspect(a))
    with open(a, "r+b") as f:  # a later tensor changes, as in a fine-tune of one layer
        f.seek(-4096, os.SEEK_END)
        f.write(b"\x01" * 64)
    os.utime(a, ns=(1, 1))
    assert inspect(a).fingerprint == inspect(bundled_model).fingerprint
    assert cache_path(inspect(a)) != before
