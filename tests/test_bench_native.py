"""edge bench --engine native [--sparse-profile P] on the bundled model, and bad input."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _engine_shared import bundled_engine, doc_text
from click.testing import CliRunner

from edge.bench.native_ops import NativeBenchContext
from edge.cli import cli
from edge.engine.generate import NativeGenerator
from edge.sparse.calibrate import calibrate
from edge.sparse.profile import build_specs
from edge.sparse.rsparse import SparseBackend
from edge.sparse.search import uniform
from edge.telemetry import read_records
from tests.conftest import edge_cmd

TINY = ["--engine", "native", "-t", "1", "--pp", "16", "--tg", "8", "--reps", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def profile50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A uniform 50% profile of the bundled model, made as cheaply as test_sparse_cli's."""
    from edge.sparse.sparsify import sparsify

    d = tmp_path_factory.mktemp("bench_native")
    calib = d / "calib.txt"
    calib.write_text(doc_text())
    sparsify(bundled_engine(), sparsity=0.5, calib=calib, out=d / "p50.json", method="uniform",
             max_calib_tokens=64)
    return d / "p50.json"


def _bench(args: list[str]) -> dict:
    r = CliRunner().invoke(cli, ["bench", *TINY, *args, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.stdout)["tests"]
    return rec


@pytest.mark.slow  # two engine loads (~8 s each) plus the profile fixture
def test_native_dense_then_sparse_bench_records_and_compare(profile50, tmp_path):
    dense = _bench(["--out", str(tmp_path / "dense.jsonl")])
    sparse = _bench(["--sparse-profile", str(profile50), "--out", str(tmp_path / "sparse.jsonl")])
    for rec in (dense, sparse):
        m, c = rec["metrics"], rec["config"]
        assert rec["kind"] == "bench" and c["engine"] == "native" and c["threads"] == 1
        assert c["native_threads"] == {"numba": 1, "blas": 1}  # the pools follow -t
        assert (m["test"], m["n_prompt"], m["n_gen"]) == ("pp16+tg8", 16, 8)
        assert m["pp_tps"] > 0 and m["tg_tps"] > 0 and m["ttft_ms"] > 0 and m["load_ms"] > 0
        assert m["native_perf_tg_tps"] >= m["tg_tps"]  # forward calls only ⊆ the timed loop
        assert m["llama_perf_pp_tps"] is None and m["llama_perf_tg_tps"] is None
        assert rec["model"]["quant"] == "Q4_1"
    assert dense["config"]["sparse_profile"] is None
    prof = sparse["config"]["sparse_profile"]
    assert prof["path"] == str(profile50) and prof["search"] == "uniform"
    assert prof["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [r["run_id"] for r in read_records("bench").records] == [dense["run_id"], sparse["run_id"]]
    r = CliRunner().invoke(cli, ["bench", "compare", str(tmp_path / "dense.jsonl"),
                                 str(tmp_path / "sparse.jsonl"), "--json"], catch_exceptions=False)
    (row,) = json.loads(r.stdout)["rows"]
    assert row["tg_ratio"] == pytest.approx(sparse["metrics"]["tg_tps"] / dense["metrics"]["tg_tps"])


class CountingBackend(SparseBackend):
    """Counts projections by the number of rows they were called with (1 = decode)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: Counter[int] = Counter()

    def project(self, il, names, x):
        self.calls[x.shape[0]] += len(names)
        return super().project(il, names, x)


def _context(backend) -> NativeBenchContext:
    e = bundled_engine()
    return NativeBenchContext(NativeGenerator(e, backend), n_ctx=64, threads=1)


def test_prefill_dense_decode_sparse():
    e = bundled_engine()
    cal = calibrate(e, doc_text(), max_tokens=64)
    sparse = CountingBackend(e, [s for s in build_specs(e, cal, uniform(e, 0.8)) if s.t >= 0])
    noop = CountingBackend(e, [])  # every projection falls through to the dense product
    logits = {}
    for name, backend in (("dense", None), ("sparse", sparse), ("noop", noop)):
        with _context(backend) as b:
            b.prompt(16)
            logits[name, "prompt"] = b.logits.copy()
            b.clear()
            b.generate(8)
            logits[name, "decode"] = b.logits.copy()
            assert b.cache.n_past == 8 and b.perf().n_eval == 8
    # Prefill never touched the backend; each decode step ran all 7 projections of 30 layers.
    assert sparse.calls == Counter({1: 8 * 30 * 7})
    np.testing.assert_array_equal(logits["sparse", "prompt"], logits["dense", "prompt"])
    np.testing.assert_allclose(logits["noop", "decode"], logits["dense", "decode"], atol=1e-4)
    assert np.abs(logits["sparse", "decode"] - logits["dense", "decode"]).max() > 0.1


def test_bad_options_one_line_exit_2(profile50, env, tmp_path):
    other = json.loads(profile50.read_text())
    other["model_fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    cases = [
        (["--sparse-profile", str(profile50)], "add --engine native"),
        (["--engine", "native", "--sparse-profile", str(tmp_path / "other.json")], "another model"),
        (["--engine", "native", "--rpc", "127.0.0.1:50052"], "--rpc"),
    ]
    for args, words in cases:
        out = tmp_path / "out.jsonl"
        p = subprocess.run([*edge_cmd(), "bench", *args, "--pp", "8", "--tg", "4", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and words in p.stderr
        assert p.stdout == "" and not out.exists()
    assert read_records("bench").records == []
