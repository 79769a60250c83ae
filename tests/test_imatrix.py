"""edge imatrix / edge quantize --imatrix: llama.cpp's importance matrix collected through
llama.cpp's graph callback, checked against the numpy engine's own activations, read and
written in both of llama.cpp's formats, and shown to lower KL on text it never saw."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from convert_helpers import TinySpec, make_checkpoint

from edge.cli import cli
from edge.imatrix import (
    Imatrix,
    ImatrixError,
    QuantizeImatrix,
    collect_imatrix,
    read_imatrix,
    write_imatrix,
)


def _docs(first: bool) -> str:
    """Python's documentation split by topic: calibration and judging never share a page."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return "\n\n".join(topics[k] for k in (keys[:half] if first else keys[half:]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("imx")
    make_checkpoint(d / "hf", TinySpec(n_embd=256, n_ff=512, n_layers=2, n_head=4, n_head_kv=2, vocab=320))
    from edge.convert import convert

    out = d / "tiny.f16.gguf"
    convert(d / "hf", out, outtype="f16")
    return out


def test_gguf_and_legacy_files_read_back_the_same_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sums = {"blk.0.attn_q.weight": rng.random(8).astype(np.float32) * 40,
            "blk.0.ffn_down.weight": rng.random(16).astype(np.float32) * 40}
    im = Imatrix(sums, {"blk.0.attn_q.weight": 40, "blk.0.ffn_down.weight": 20}, ["docs"], 3, 512)
    write_imatrix(im, tmp_path / "m.gguf")
    back = read_imatrix(tmp_path / "m.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["docs"], 3, 512)
    for n in sums:
        np.testing.assert_allclose(back.values()[n], sums[n] / im.counts[n], rtol=1e-6)
    # llama-imatrix's legacy .dat stores mean·ncall per entry, then chunks and dataset
    blob = struct.pack("<i", len(sums))
    for n, s in sums.items():
        ncall = 7
        blob += struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", ncall, s.size)
        blob += (s / im.counts[n] * ncall).astype("<f4").tobytes()
    blob += struct.pack("<ii", 3, 4) + b"docs"
    (tmp_path / "m.dat").write_bytes(blob)
    legacy = read_imatrix(tmp_path / "m.dat")
    assert legacy.chunk_count == 3 and legacy.datasets == ["docs"]
    for n in sums:
        np.testing.assert_allclose(legacy.values()[n], sums[n] / im.counts[n], rtol=1e-5)
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00garbage")
    with pytest.raises(ImatrixError, match="neither a GGUF nor a legacy"):
        read_imatrix(tmp_path / "junk.dat")


def test_an_imatrix_for_another_model_is_refused_with_no_file(tiny: Path, tmp_path: Path) -> None:
    bad = Imatrix({"blk.0.attn_q.weight": np.ones(100, np.float32)}, {"blk.0.attn_q.weight": 1})
    write_imatrix(bad, tmp_path / "other.gguf")
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(tiny), "-o", str(out), "--type", "Q4_0",
                                   "--imatrix", str(tmp_path / "other.gguf")])
    assert res.exit_code == 2 and "another model" in res.output and res.output.count("\n") == 1, res.output
    assert not out.exists() and not list(tmp_path.glob("q.gguf*"))
    with pytest.raises(ImatrixError, match="no tensor of this model"):
        QuantizeImatrix(Imatrix({"x.weight": np.ones(4)}, {"x.weight": 1})).check({"blk.0.attn_q.weight": 256})
    # a type that needs one says how to make it
    res = CliRunner().invoke(cli, ["quantize", str(tiny), "-o", str(out), "--type", "IQ2_XS"])
    assert res.exit_code == 2 and "edge imatrix" in res.output and not out.exists()


def test_ctrl_c_keeps_the_finished_chunks(tiny: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def stop_after_one() -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # before the second chunk
            raise KeyboardInterrupt

    text = _docs(True)[:40_000]
    r = collect_imatrix(tiny, text, tmp_path / "part.gguf", n_ctx=64, max_chunks=5, check=stop_after_one)
    assert r.interrupted and r.chunks == 1
    im = read_imatrix(tmp_path / "part.gguf")
    assert im.chunk_count == 1 and set(im.counts.values()) == {64}

    def stop_now() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_imatrix(tiny, text, tmp_path / "none.gguf", n_ctx=64, max_chunks=5, check=stop_now)
    assert not list(tmp_path.glob("none.gguf*"))


@pytest.mark.slow
def test_llama_cpp_collects_what_the_engine_computes(bundled_model: Path, tmp_path: Path) -> None:
    """Σx² per input channel from llama.cpp's graph equals the numpy engine's on the same chunks."""
    from _engine_shared import bundled_engine

    from edge.engine.weights import _tensor_keys
    from edge.sparse.calibrate import _Recorder

    text, n_ctx, chunks = _docs(True), 128, 3
    r = collect_imatrix(bundled_model, text, tmp_path / "im.gguf", n_ctx=n_ctx, max_chunks=chunks)
    assert (r.entries, r.chunks) == (30 * 7, chunks)
    im = read_imatrix(tmp_path / "im.gguf")
    assert set(im.counts.values()) == {n_ctx * chunks}
    eng = bundled_engine()
    toks = eng.tokenize(text, add_bos=False)
    head = eng.tokenize(text[:50], add_bos=True)[: -len(eng.tokenize(text[:50], add_bos=False)) or None]
    step = n_ctx - len(head)  # each chunk starts with BOS when the model adds one (SmolLM2 does not)
    rec = _Recorder(eng, np.random.default_rng(0))
    for c in range(chunks):
        eng.forward([*head, *toks[c * step : (c + 1) * step]], backend=rec, last_only=True)
    keys = _tensor_keys()
    rel = {}
    for (il, n), sq in rec.sum_sq.items():
        got = im.sums[keys[n].format(bid=il) + ".weight"]
        rel[(il, n)] = float(np.abs(got - sq).sum() / np.abs(sq).sum())
    # layer 0's q/k/v read the normed embedding: llama.cpp and numpy differ only by rounding
    assert rel[(0, "q")] < 1e-4, rel[(0, "q")]
    # deeper inputs pass through Q4_1 products with 8-bit activations in llama.cpp: close, not
    # equal (measured here: median 0.4%, worst 3.8%)
    assert max(rel.values()) < 0.1 and np.median(list(rel.values())) < 0.02, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    np.testing.assert_array_equal(im.sums["blk.5.attn_q.weight"], im.sums["blk.5.attn_v.weight"])
    np.testing.assert_array_equal(im.sums["blk.5.ffn_gate.weight"], im.sums["blk.5.ffn_up.weight"])


@pytest.mark.slow
def test_quantizing_with_it_lowers_kl_on_text_it_never_saw(bundled_model: Path, tmp_path: Path) -> None:
    from edge.dequant import f16_copy

    src = f16_copy(bundled_model)
    (tmp_path / "calib.txt").write_text(_docs(True))
    (tmp_path / "judge.txt").write_text(_docs(False))
    run = CliRunner().invoke
    res = run(cli, ["imatrix", str(src), "-f", str(tmp_path / "calib.txt"), "-o", str(tmp_path / "im.gguf"),
                    "--chunks", "4"])
    assert res.exit_code == 0 and "210 tensors, 4 chunks of 512 tokens" in res.output, res.output
    kl = {}
    for tag, extra in (("plain", []), ("imatrix", ["--imatrix", str(tmp_path / "im.gguf")])):
        out = tmp_path / f"{tag}.gguf"
        res = run(cli, ["quantize", str(src), "-o", str(out), "--type", "Q4_0", *extra])
        assert res.exit_code == 0, res.output
        assert ("importance matrix for 210 tensors" in res.output) == (tag == "imatrix")
        fields = gguf.GGUFReader(out).fields  # llama-quantize's record of the imatrix, or none
        rec = {k: fields[k].contents() for k in fields if k.startswith("quantize.imatrix.")}
        assert rec == ({"quantize.imatrix.file": "im.gguf", "quantize.imatrix.dataset": "calib.txt",
                        "quantize.imatrix.entries_count": 210, "quantize.imatrix.chunks_count": 4}
                       if tag == "imatrix" else {})
        res = run(cli, ["models", "info", str(out)])
        assert ("importance matrix     im.gguf (210 tensors, 4 chunks of calib.txt)" in res.output) == (tag == "imatrix")
        res = run(cli, ["eval", "ppl", str(out), "--text", str(tmp_path / "judge.txt"), "--base", str(src),
                        "--chunks", "3", "--json"])
        assert res.exit_code == 0, res.output
        kl[tag] = json.loads(res.output[res.output.index("{"):])["kld_mean"]
    # measured here: 0.257 → 0.154 with 4 chunks calibrating and 3 judging; a fifth less is a
    # wide margin
    assert kl["imatrix"] < 0.8 * kl["plain"], kl
