"""edge quantize: llama.cpp's quantizer behind edge's options, types and error handling."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from convert_helpers import TinySpec, llama_logits, make_checkpoint

from edge.cli import cli
from edge.convert import convert
from edge.quantize import QUANT_TYPES, quantize


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("q")
    # 256-wide rows: the k-quants' super-block size, so no tensor needs a fallback type.
    make_checkpoint(d / "hf", TinySpec("bpe", n_embd=256, n_ff=512, n_head=4, n_head_kv=2, seed=11))
    out = d / "m.f32.gguf"
    convert(d / "hf", out, outtype="f32")
    return out


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_q4_k_m_mixture_and_quality(tmp_path: Path, f32_model: Path) -> None:
    out = tmp_path / "m.Q4_K_M.gguf"
    r = quantize(f32_model, out, qtype="q4_k_m")
    types = _types(out)
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert "Q6_K" in types.values()  # the _M mix keeps some tensors (output, v/down) wider
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert r.type == "Q4_K_M" and r.output_size == out.stat().st_size
    assert 4.5 < r.bpw < 7 and r.output_size < r.input_size / 4
    fields = gguf.GGUFReader(out).fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # Random weights amplify noise, so judge the ordering of errors, not a fixed threshold:
    # 8-bit must sit closer to f32 than 4-bit, and both far closer than an unrelated model.
    q8 = tmp_path / "m.Q8_0.gguf"
    quantize(f32_model, q8, qtype="Q8_0")
    tokens = list(range(3, 60))
    ref = llama_logits(f32_model, tokens)
    err = {p.name: np.abs(llama_logits(p, tokens) - ref).mean() / np.abs(ref).mean() for p in (out, q8)}
    assert err[q8.name] < err[out.name] / 2, err
    assert err[out.name] < 0.5, err


def test_pure_and_per_tensor_types(tmp_path: Path, f32_model: Path) -> None:
    out = tmp_path / "pure.gguf"
    quantize(f32_model, out, qtype="Q4_0", pure=True, output_type="q8_0", embedding_type="F16")
    types = _types(out)
    assert types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "F16"
    assert {v for k, v in types.items() if k.startswith("blk.") and "norm" not in k} == {"Q4_0"}
    kept = tmp_path / "kept.gguf"
    quantize(f32_model, kept, qtype="Q8_0", leave_output_tensor=True)
    assert _types(kept)["output.weight"] == "F32"
    assert _types(kept)["blk.1.ffn_down.weight"] == "Q8_0"


def test_type_list() -> None:
    res = CliRunner().invoke(cli, ["quantize", "--type", "list"])
    assert res.exit_code == 0
    line = next(x for x in res.stdout.splitlines() if x.startswith("Q4_K_M "))
    assert line.split()[1] == "4.5" and "Llama-3-8B" in line
    rows = json.loads(CliRunner().invoke(cli, ["quantize", "--type", "list", "--json"]).stdout)
    assert [r["type"] for r in rows] == list(QUANT_TYPES)
    assert {r["type"]: r["bpw"] for r in rows}["Q8_0"] == 8.5


@pytest.mark.parametrize("args,expect", [
    (["--type", "Q9_X"], "unknown quant type 'Q9_X'"),
    (["--type", "IQ2_XXS"], "needs an importance matrix"),
    (["--type", "Q4_0", "--output-type", "q7"], "'q7' is not one of"),
])
def test_bad_options(tmp_path: Path, f32_model: Path, args: list[str], expect: str) -> None:
    out = tmp_path / "o.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(f32_model), "-o", str(out), *args])
    assert res.exit_code == 2 and expect in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_input_and_existing_output(tmp_path: Path, f32_model: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    out = tmp_path / "o.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(bad), "-o", str(out), "--type", "Q4_0"])
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and not out.exists()
    out.write_bytes(b"keep")
    res = CliRunner().invoke(cli, ["quantize", str(f32_model), "-o", str(out), "--type", "Q4_0"])
    assert res.exit_code == 2 and "--force" in res.stderr and out.read_bytes() == b"keep"
    res = CliRunner().invoke(cli, ["quantize", str(f32_model), "-o", str(out), "--type", "Q4_0", "--force", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["type"] == "Q4_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "o.gguf"]  # no temp files


def test_fallback_tensors_are_counted_not_printed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Rows of 96 values are not a multiple of Q4_K's 256: llama.cpp stores those tensors in
    another type and logs one line per tensor at error level. edge counts them and says so
    in one line; nothing of llama.cpp's reaches the terminal."""
    make_checkpoint(tmp_path / "hf", TinySpec("bpe", n_embd=96, n_ff=192, n_head=4, n_head_kv=2, seed=5))
    src = tmp_path / "m.f32.gguf"
    convert(tmp_path / "hf", src, outtype="f32")
    capfd.readouterr()
    r = quantize(src, tmp_path / "m.q4km.gguf", qtype="Q4_K_M")
    err = capfd.readouterr().err
    assert "falling back" not in err and "warning" not in err.lower(), err[:300]
    assert sum(r.fallback.values()) >= 2 * 7 and set(r.fallback) <= {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "b.gguf"), "--type", "Q4_K_M"])
    assert res.exit_code == 0 and "rows that are not a multiple of Q4_K_M's block size" in res.output
