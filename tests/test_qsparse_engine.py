"""The quantized engine on a converted random checkpoint: its fused decode step (masks, active
rows, low-rank term, attention) and its batched prefill equal the reference engine's
R-Sparse formula run on the same dequantized values; the generation API and the store's
errors behave as documented."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import TinySpec, corpus, make_checkpoint

from edge.convert import convert
from edge.engine import Engine
from edge.engine.verify import kl_rows
from edge.errors import SparseProfileError
from edge.sampling import Sampling
from edge.sparse.calibrate import calibrate
from edge.sparse.profile import SparseProfile, build_specs
from edge.sparse.qformat import dequantize_rows
from edge.sparse.qrows import build_qrows
from edge.sparse.qstore import QRowsError, QStore

SPEC = TinySpec("spm", n_embd=64, n_layers=2, n_head=4, n_head_kv=2, n_ff=128, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Engine]:
    d = tmp_path_factory.mktemp("tiny")
    make_checkpoint(d / "hf", SPEC)
    gguf = d / "tiny.f32.gguf"
    convert(d / "hf", gguf, outtype="f32")
    engine = Engine.from_gguf(gguf)
    cal = calibrate(engine, " ".join(corpus(200, seed=1)), max_tokens=256)
    # 50% everywhere; gate and down keep a fifth of their budget in a low-rank term
    alloc = {(il, n): (0.5, 0.8 if n in ("gate", "down") else 1.0)
             for il in range(SPEC.n_layers) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    prof = SparseProfile(model_fingerprint=engine.info.fingerprint, model_name="tiny",
                         calib_sha256=cal.text_sha256, calib_tokens=len(cal.tokens), target_sparsity=0.5,
                         sparsity=0.5, search="uniform", kl=None, modules=build_specs(engine, cal, alloc))
    assert any(m.r > 0 for m in prof.modules)
    prof.save(d / "p50.json")
    return gguf, d / "p50.json", engine


class _Factors:
    """SvdCache's interface over the dequantized low-rank rows of a store."""

    def __init__(self, lowrank: QStore, rows: QStore) -> None:
        self.lr, self.rows = lowrank, rows

    def factors(self, layer: int, name: str, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = (_deq(self.lr, f"blk.{layer}.{name}.{x}") for x in "ab")
        b = b * _out_scales(self.rows, f"blk.{layer}.{name}")  # B is stored divided by them
        return np.ascontiguousarray(a[:, :r]), np.ascontiguousarray(b[:r, : self.n_out(layer, name)])

    def n_out(self, layer: int, name: str) -> int:
        return int(self.lr.entry(f"blk.{layer}.{name}.b")["n_cols"])


def _deq(store: QStore, name: str) -> np.ndarray:
    q, d, fmt = store.matrix(name)
    return dequantize_rows(q, d, fmt)[:, : store.entry(name)["n_cols"]]


def _out_scales(store: QStore, name: str) -> np.ndarray:
    s = store.out_scales(name)
    return np.ones(1, np.float32) if s is None else s[: store.entry(name)["n_cols"]]


def _reference(engine: Engine, store: QStore) -> Engine:
    """The f32 engine with every weight replaced by the value the quantized rows hold."""
    w = copy.copy(engine.weights)
    w.layers = [replace(lw, wt={n: _deq(store, f"blk.{il}.{n}") * _out_scales(store, f"blk.{il}.{n}") for n in lw.wt})
                for il, lw in enumerate(engine.weights.layers)]
    w.tok_embd = _deq(store, "token_embd")
    w.output = np.ascontiguousarray(_deq(store, "output").T)
    ref = Engine(w)
    # the masks use the channel norms of the original weights, as the profile was calibrated
    ref._channel_norms = {(il, n): np.array(store.norms(f"blk.{il}.{n}"))  # type: ignore[attr-defined]
                          for il in range(len(w.layers)) for n in w.layers[0].wt}
    return ref


@pytest.mark.parametrize("kernels", ["c", "numba"])
@pytest.mark.parametrize("weights", ["q8", "q4"])
def test_decode_equals_reference_formula(tiny, weights: str, kernels: str) -> None:
    from edge.sparse.qengine import QuantizedEngine
    from edge.sparse.rsparse import SparseBackend

    gguf, prof_path, engine = tiny
    qe = QuantizedEngine.load(gguf, prof_path, weights=weights, kernels=kernels)
    assert qe.sparse and qe.lowrank is not None and qe.kernels == kernels
    ref = _reference(engine, qe.store)
    specs = [m for m in SparseProfile.load(prof_path).modules if m.t >= 0]
    backend = SparseBackend(ref, specs, _Factors(qe.lowrank, qe.store))
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, ref.config.n_vocab, 40)]
    cache, rcache = qe.new_cache(64), ref.new_cache(64)
    # dense prefill of 24 tokens: every position's logits
    got = qe.prefill(tokens[:24], cache, all_logits=True)
    want = ref.forward(tokens[:24], cache=rcache).logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # sparse decode of the rest, one token at a time
    qe.reset_counts()
    for t in tokens[24:]:
        got = qe.decode(t, cache)
        want = ref.forward([t], cache=rcache, backend=backend).logits[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    rs = qe.read_stats()
    assert rs.tokens == 16 and 0.35 < rs.active < 0.65 and rs.fraction < 0.85
    # with every row active (no profile) the same rows decode the dense model
    dense = qe.with_profile(None)
    c2 = dense.new_cache(64)
    dense.prefill(tokens[:24], c2)
    got = dense.decode(tokens[24], c2)
    want = ref.forward(tokens[:25]).logits[-1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert dense.read_stats().fraction == 1.0 and not dense.sparse
    assert kl_rows(want[None], qe.decode(tokens[24], cache)[None])[0] > 1e-4  # sparsity changed it


def test_store_is_cached_keyed_and_checked(tiny, tmp_path: Path) -> None:
    gguf, prof_path, engine = tiny
    a = build_qrows(gguf, weights="q8")
    b = build_qrows(gguf, weights="q8")
    assert a.path == b.path and not b.built and a.bits_per_weight == pytest.approx(8.5, abs=0.01)
    c = build_qrows(gguf, weights="q4")
    assert c.path != a.path and c.bits_per_weight == pytest.approx(4.5, abs=0.01)
    assert c.output_bits_per_weight == pytest.approx(8.5, abs=0.01)  # q8 output unless asked
    assert build_qrows(gguf, weights="q4", output_weights="q4").output_bits_per_weight == pytest.approx(4.5, abs=0.01)
    assert 0 < a.worst_error < c.worst_error < 0.2  # what quantizing cost, per format
    # a profile made for another model fails before any work
    other = json.loads(prof_path.read_text())
    other["model_fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SparseProfileError, match="another model"):
        build_qrows(gguf, tmp_path / "other.json")
    # a damaged file is named and rebuilt, never trusted
    Path(a.path).write_bytes(b"EDGEQRW1" + b"\xff" * 30)
    with pytest.raises(QRowsError, match="corrupt|truncated"):
        QStore(a.path)
    assert build_qrows(gguf, weights="q8").built


def test_generation_api(tiny) -> None:
    from edge.sparse.qengine import QuantizedEngine
    from edge.sparse.qgenerate import QuantizedGenerator

    gguf, prof_path, _ = tiny
    g = QuantizedGenerator(QuantizedEngine.load(gguf, prof_path, weights="q8"), n_ctx=96)
    prompt = g.tokenize("the quick brown fox jumps over the lazy dog")
    st = g.generate(prompt, max_tokens=12, sampling=Sampling(temp=0))
    assert st.n_prompt_tokens == len(prompt) == st.n_prompt_evaluated
    assert 1 <= st.n_gen_tokens <= 12 and st.stop_reason in ("length", "eos")
    assert st.text == g.model.detokenize(st.token_ids) and st.peak_rss_bytes > 0
    again = g.generate(prompt, max_tokens=12, sampling=Sampling(temp=0))
    assert again.token_ids == st.token_ids and again.n_prompt_evaluated == 1  # the prefix was reused
    drawn = [g.generate(prompt, max_tokens=8, sampling=Sampling(temp=1.5, seed=s)).token_ids for s in (1, 1, 2)]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]
    if st.n_gen_tokens >= 3:
        stop = g.model.detokenize(st.token_ids[2:3]).strip() or None
        if stop:
            cut = g.generate(prompt, max_tokens=12, sampling=Sampling(temp=0), stop=[stop])
            assert cut.stop_reason == "stop" and stop not in cut.text


def test_q8_rows_match_llamacpp_q8_0(bundled_model: Path, tmp_path: Path) -> None:
    """s = 0 on the real model: the q8 engine's decode logits (the fused kernels, token by
    token) against llama.cpp on a Q8_0 file and on the f16 file it was made from, 512 tokens.

    Two independent 8-bit formats cannot agree better than each agrees with f16: here
    llama.cpp's own Q8_0 picks the same top-1 token as its f16 file on 95.7% of positions
    (KL 0.0046), and the q8 rows (blocks along the output dimension, not the input one)
    94.9% (KL 0.0040); against each other 94.3% (KL 0.0083). So the q8 rows are held to
    being as close to f16 as Q8_0 is, and to KL ≤ 0.01 against Q8_0 itself."""
    import pydoc

    from convert_helpers import llama_logits

    from edge.dequant import f16_copy
    from edge.logprobs import kl_rows
    from edge.quantize import quantize
    from edge.sparse.qengine import QuantizedEngine

    src = f16_copy(bundled_model)
    q8_0 = tmp_path / "q8_0.gguf"
    quantize(src, q8_0, qtype="Q8_0")
    qe = QuantizedEngine.load(src, weights="q8")
    text = "\n\n".join(pydoc.getdoc(__import__(m)) for m in ("collections", "json", "functools", "re"))
    toks = qe.tokenize(text)[:512]
    assert len(toks) == 512
    q8_0_logits, f16_logits = llama_logits(q8_0, toks), llama_logits(src, toks)
    cache = qe.new_cache(513)
    got = np.stack([qe.prefill(toks[:1], cache).copy()] + [qe.decode(t, cache).copy() for t in toks[1:]])

    def agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        return float(np.mean(a.argmax(-1) == b.argmax(-1))), float(np.mean(kl_rows(a, b)))

    top1, kl = agree(q8_0_logits, got)
    assert top1 >= 0.93 and kl <= 0.01, (top1, kl)
    ours, theirs = agree(f16_logits, got), agree(f16_logits, q8_0_logits)
    assert ours[1] <= 1.25 * theirs[1] and ours[0] >= theirs[0] - 0.02, (ours, theirs)


def test_sparsify_weights_then_run_and_bench(tiny, tmp_path: Path) -> None:
    """`edge sparsify --weights q4` names the rows in the profile and builds them; run and
    bench with that profile then use the quantized engine; a bad format is refused (exit 2)."""
    from click.testing import CliRunner

    from edge.cli import cli
    from edge.session import open_session
    from edge.sparse.qgenerate import QuantizedGenerator

    gguf, _, _ = tiny
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(corpus(300, seed=2)))
    out = tmp_path / "q4-50.json"
    args = ["sparsify", str(gguf), "--sparsity", "0.5", "--calib", str(calib), "-o", str(out),
            "--search", "uniform", "--calib-tokens", "128"]
    r = CliRunner().invoke(cli, [*args, "--weights", "q3"])
    assert r.exit_code == 2 and not out.exists()
    r = CliRunner().invoke(cli, [*args, "--weights", "q4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "q4 rows, 4.50 bits/weight" in r.output
    assert SparseProfile.load(out).weights == "q4"
    gen = open_session(gguf, sparse_profile=out)
    assert isinstance(gen, QuantizedGenerator) and gen.model.weights == "q4" and gen.model.sparse
    st = gen.generate(gen.tokenize("the quick brown fox"), max_tokens=4, sampling=Sampling(temp=0))
    assert st.n_gen_tokens >= 1 and gen.config_record()["weights"] == "q4"
    r = CliRunner().invoke(cli, ["bench", str(gguf), "--engine", "native", "--sparse-profile", str(out),
                                 "--pp", "8", "--tg", "4", "--reps", "1", "-t", "1", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)["tests"][0]["config"]
    assert cfg["native_weights"] == "q4" and cfg["native_threads"]["kernels"] == 1


@pytest.fixture
def fresh_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """qnative as in a new process: nothing built or tried yet, an empty kernel cache."""
    from edge.sparse import qnative

    monkeypatch.setattr(qnative, "_LIB", None)
    monkeypatch.setattr(qnative, "_TRIED", False)
    monkeypatch.setattr(qnative, "BUILD_ERROR", None, raising=False)
    monkeypatch.setenv("EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE_QKERNELS", raising=False)
    return qnative


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"], ids=["no-compiler", "compile-fails"])
def test_without_c_compiler_the_engine_falls_back_to_numba(tiny, fresh_kernels, monkeypatch, cc: str) -> None:
    """A Pi without a compiler (or with a broken one) still decodes, on the numba kernels,
    to the same tokens; asking for the C kernels explicitly fails with what to do."""
    from edge.sparse.qengine import QuantizedEngine
    from edge.sparse.qnative import KernelBuildError

    gguf, prof_path, _ = tiny
    monkeypatch.setenv("CC", cc)
    qe = QuantizedEngine.load(gguf, prof_path, weights="q8")
    assert qe.kernels == "numba" and fresh_kernels.BUILD_ERROR
    assert not list((Path(fresh_kernels.cache_dir()) / "kernels").glob("*.so"))
    with pytest.raises(KernelBuildError, match="install a C compiler"):
        QuantizedEngine.load(gguf, prof_path, weights="q8", kernels="c")
    monkeypatch.setenv("EDGE_QKERNELS", "c")
    with pytest.raises(KernelBuildError):
        QuantizedEngine.load(gguf, prof_path, weights="q8")


def test_edge_qkernels_numba_never_builds_the_c_kernels(tiny, fresh_kernels, monkeypatch) -> None:
    from edge.sparse.qengine import QuantizedEngine

    gguf, prof_path, _ = tiny
    monkeypatch.setenv("EDGE_QKERNELS", "numba")
    monkeypatch.setenv("CC", "/nonexistent/cc")  # would fail if a build were tried
    qe = QuantizedEngine.load(gguf, prof_path, weights="q4")
    assert qe.kernels == "numba" and not fresh_kernels._TRIED and fresh_kernels.BUILD_ERROR is None
    cache = qe.new_cache(16)
    qe.prefill([1, 2, 3], cache)
    assert np.isfinite(qe.decode(4, cache)).all()


def test_output_scales_keep_small_outputs_beside_a_large_one() -> None:
    """Rows of Wᵀ share a block scale across 32 outputs: one output channel 100× larger than
    the rest (as the residual dimensions with massive activations are) rounds the others to
    nothing at 4 bits unless each output is divided by its scale first (qformat)."""
    from edge.sparse.qformat import Q4, output_scales, quantize_rows

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)  # (out, in)
    w[5] *= 100.0

    def err(wt: np.ndarray, s: np.ndarray) -> float:
        q, d = quantize_rows(wt, Q4)
        back = dequantize_rows(q, d, Q4)[:, :64] * s
        small = np.arange(64) != 5
        return float(np.linalg.norm((back - w.T)[:, small]) / np.linalg.norm(w.T[:, small]))

    plain = err(np.ascontiguousarray(w.T), np.ones(64, np.float32))
    s = output_scales(w)
    scaled = err(np.ascontiguousarray((w / s[:, None]).T), s)
    assert plain > 0.5 and scaled < 0.15, (plain, scaled)


def test_c_engine_with_a_profile_never_imports_numba(tiny) -> None:
    """numba (llvmlite and its JIT) is ~60 MB of RSS: loading and decoding a sparse profile
    on the C kernels must not import it (it once came in through the profile's imports,
    and the sparse engine's peak RSS was 1.5× llama.cpp's instead of 1.0×)."""
    import subprocess
    import sys

    gguf, prof_path, _ = tiny
    code = ("import sys\nfrom edge.sparse.qengine import QuantizedEngine\n"
            f"qe = QuantizedEngine.load({str(gguf)!r}, {str(prof_path)!r}, weights='q8', kernels='c')\n"
            "c = qe.new_cache(16); qe.prefill([1, 2, 3], c); qe.decode(4, c)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
