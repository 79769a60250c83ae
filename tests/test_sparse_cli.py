"""edge sparsify / edge run --sparse-profile end to end on the bundled model, and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _engine_shared import bundled_engine, doc_text
from conftest import edge_cmd

from edge.sparse.calibrate import calibrate
from edge.sparse.profile import build_specs
from edge.sparse.rsparse import SparseBackend
from edge.sparse.search import uniform
from edge.telemetry import headline


def _edge(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(edge_cmd() + args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory):
    import os

    d = tmp_path_factory.mktemp("sparse")
    calib = d / "calib.txt"
    calib.write_text(doc_text())
    prof, imat = d / "p40.json", d / "imatrix.gguf"
    env = dict(os.environ, EDGE_HOME=str(d / "home"))
    r = _edge(["sparsify", "--sparsity", "0.4", "--calib", str(calib), "-o", str(prof), "--search",
               "uniform", "--calib-tokens", "128", "--imatrix", str(imat), "--json"], env)
    assert r.returncode == 0, r.stderr
    return calib, prof, imat, json.loads(r.stdout)


@pytest.mark.slow
def test_sparsify_writes_a_checked_profile(made, bundled_model):
    from edge.gguf_file import inspect

    calib, prof, _, res = made
    p = json.loads(prof.read_text())
    assert p["format"] == "edge-sparse-profile/1"
    assert p["model_fingerprint"] == inspect(bundled_model).fingerprint
    assert p["calib_sha256"] == hashlib.sha256(calib.read_text().encode()).hexdigest()
    assert p["sparsity"] == pytest.approx(0.4) and res["sparsity"] == pytest.approx(0.4)
    assert len(p["modules"]) == 30 * 7
    for m in p["modules"]:
        n_in = {"down": 1536}.get(m["name"], 576)
        assert m["alpha"] == 1.0 and m["r"] == 0 and m["t"] > 0
        assert m["k"] == int(n_in * 0.6)
    assert 0 < res["kl"] < 5
    # the figures went to the run log, and edge logs shows them
    recs = [json.loads(x) for f in (prof.parent / "home" / "logs").glob("runs-*.jsonl") for x in f.read_text().splitlines()]
    (rec,) = [r for r in recs if r["kind"] == "sparsity"]
    assert rec["metrics"]["kl"] == res["kl"] and rec["model"]["sha256"] == p["model_fingerprint"]
    assert headline(rec) == f"40% sparse (uniform): KL {res['kl']:.4f} nats/token (uniform {res['uniform_kl']:.4f})"


@pytest.mark.slow
def test_imatrix_from_the_same_pass(made):
    from gguf import GGUFReader

    _, _, imat, _ = made
    r = GGUFReader(imat)
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.29.ffn_down.weight.counts" in names
    assert len(names) == 30 * 7 * 2
    q = next(t for t in r.tensors if t.name == "blk.3.attn_q.weight.in_sum2")
    k = next(t for t in r.tensors if t.name == "blk.3.attn_k.weight.in_sum2")
    assert np.all(q.data > 0)
    np.testing.assert_array_equal(q.data, k.data)  # q and k read the same normed input


@pytest.mark.slow
def test_run_with_profile_and_wrong_model(made, env, tmp_path):
    _, prof, _, _ = made
    r = _edge(["run", "--sparse-profile", str(prof), "-p", "The river", "--raw", "-n", "6",
               "--temp", "0", "--json"], env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_gen_tokens"] == 6 and out["text"]
    other = json.loads(prof.read_text())
    other["model_fingerprint"] = "0" * 64
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    r = _edge(["run", "--sparse-profile", str(bad), "-p", "hi", "-n", "2"], env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "another model" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "0.96"], "outside [0, 0.95]"),
    (["--sparsity", "-0.1"], "outside [0, 0.95]"),
    (["--sparsity", "0.5", "--search", "annealing"], "annealing"),
])
def test_bad_options(args, words, env, tmp_path: Path):
    calib = tmp_path / "c.txt"
    calib.write_text(doc_text())
    out = tmp_path / "p.json"
    r = _edge(["sparsify", *args, "--calib", str(calib), "-o", str(out)], env)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


def test_short_calibration_text(env, tmp_path: Path):
    calib = tmp_path / "c.txt"
    calib.write_text("Too short to calibrate anything.")
    out = tmp_path / "p.json"
    r = _edge(["sparsify", "--sparsity", "0.5", "--calib", str(calib), "-o", str(out)], env)
    assert r.returncode == 2 and "calibration text is" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".p.json*"))


def test_zero_sparsity_profile_is_dense_and_kernel_matches_numpy():
    e = bundled_engine()
    cal = calibrate(e, doc_text(), max_tokens=64)
    tokens = cal.tokens[:12]
    dense = e.forward(tokens).logits
    zero = SparseBackend(e, build_specs(e, cal, uniform(e, 0.0)))
    np.testing.assert_array_equal(e.forward(tokens, backend=zero).logits, dense)
    # Decode through the fused kernel equals the numpy formula at 50%.
    specs = build_specs(e, cal, uniform(e, 0.5))
    outs = []
    for use_kernel in (True, False):
        cache = e.new_cache(16)
        e.forward(tokens[:-1], cache=cache)
        outs.append(e.forward(tokens[-1:], cache=cache, backend=SparseBackend(e, specs, use_kernel=use_kernel)).logits)
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-3)
    assert np.abs(outs[0] - dense[-1:]).max() > 1e-2  # 50% sparsity does change the answer


@pytest.mark.slow
def test_eval_ppl_with_sparse_profile(made, env):
    calib, prof, _, _ = made
    r = _edge(["eval", "ppl", "--text", str(calib), "--ctx", "128", "--chunks", "2",
               "--sparse-profile", str(prof), "--json"], env)
    assert r.returncode == 0, r.stderr
    sp = json.loads(r.stdout)
    assert sp["n_chunks"] == 2 and 2 * 60 <= sp["n_scored"] <= 2 * 64
    assert sp["kl"] > 0 and sp["ppl"] > sp["dense_ppl"]  # 40% sparsity costs something
    # The engine's dense PPL agrees with llama.cpp's on the same chunks (Q4_1 activations differ).
    r = _edge(["eval", "ppl", "--text", str(calib), "--ctx", "128", "--chunks", "2", "--json"], env)
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout)["ppl"]
    assert abs(sp["dense_ppl"] / ref - 1) < 0.10
