"""edge eval ppl: llama-perplexity's scheme, checked on hand-computed cases, against an
independent numpy forward as the logits source, and end to end on the bundled model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from convert_helpers import TinySpec, make_checkpoint, numpy_forward

from edge.cli import cli
from edge.convert import convert
from edge.evaluate import TokenScores, perplexity, score_chunks, summarize
from edge.telemetry import headline, read_records

GPL3 = Path("/usr/share/common-licenses/GPL-3")  # Debian base-files: long English prose


def test_uniform_model_has_perplexity_of_vocab_size() -> None:
    n_vocab, n_ctx = 50, 16
    seen: list[list[int]] = []

    def uniform(tokens, first):  # type: ignore[no-untyped-def]
        seen.append(list(tokens))
        return np.zeros((len(tokens) - first, n_vocab))

    tokens = list(range(3, 3 + 45))  # 2 full chunks of 16 and a partial one, dropped
    s = score_chunks(tokens, n_ctx, uniform, bos=1, base_fn=uniform)
    r = summarize(s, model="u", n_ctx=n_ctx, n_tokens=len(tokens), base="u")
    assert [c[0] for c in seen] == [1, 1, 1, 1]  # BOS replaces each chunk's first token
    assert seen[0][1:] == tokens[1:16] and seen[2][1:] == tokens[17:32]  # no overlap
    assert r.n_chunks == 2 and r.n_scored == 2 * (16 - 8 - 1)
    assert r.ppl == pytest.approx(n_vocab) and r.ppl_err == 0.0
    assert r.kld_mean == 0.0 and r.top1_agreement == 1.0 and r.delta_ppl == pytest.approx(0.0)
    one = summarize(score_chunks(tokens, n_ctx, uniform, max_chunks=1), model="u", n_ctx=n_ctx,
                    n_tokens=len(tokens))
    assert one.n_chunks == 1 and one.n_scored == 7  # --chunks 1, as llama-perplexity's


def test_summary_formulas_by_hand() -> None:
    # Two scored tokens with p = 1/2 and 1/4; base gives 1/4 and 1/4.
    s = TokenScores(nll=[np.log([2.0, 4.0])], base_nll=[np.log([4.0, 4.0])],
                    kld=[np.array([0.1, 0.3])], same_top=[np.array([1.0, 0.0])])
    r = summarize(s, model="m", n_ctx=4, n_tokens=8, base="b")
    assert r.ppl == pytest.approx(math.sqrt(8))
    # llama-perplexity's ±: sqrt(var(nll) / (n - 1)) · PPL, var = E[x²] - E[x]²
    nll = np.log([2.0, 4.0])
    assert r.ppl_err == pytest.approx(math.sqrt((nll**2).mean() - nll.mean() ** 2) * math.sqrt(8))
    assert r.base_ppl == pytest.approx(4.0) and r.delta_ppl == pytest.approx(math.sqrt(8) - 4)
    assert r.kld_mean == pytest.approx(0.2) and r.kld_max == pytest.approx(0.3)
    assert r.top1_agreement == 0.5 and r.ln_ppl_ratio == pytest.approx(math.log(math.sqrt(8) / 4))


def test_matches_numpy_forward_oracle(tmp_path: Path) -> None:
    spec = TinySpec("spm", n_head_kv=2, seed=21)
    weights = make_checkpoint(tmp_path / "hf", spec)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    gguf_path = tmp_path / "m.gguf"
    convert(tmp_path / "hf", gguf_path, outtype="f32")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog in the morning light"] * 30))

    r = perplexity(gguf_path, text, n_ctx=64, threads=1)

    from sentencepiece import SentencePieceProcessor

    tokens = [1, *SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model")).encode(text.read_text())]
    assert r.n_tokens == len(tokens)
    oracle = summarize(score_chunks(tokens, 64, lambda t, f: numpy_forward(weights, cfg, list(t))[f:], bos=1),
                       model="numpy", n_ctx=64, n_tokens=len(tokens))
    assert r.n_scored == oracle.n_scored == (len(tokens) // 64) * 31
    assert r.ppl == pytest.approx(oracle.ppl, rel=1e-3)
    assert r.ppl_err == pytest.approx(oracle.ppl_err, rel=1e-2)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not GPL3.is_file():
        pytest.skip("no /usr/share/common-licenses/GPL-3 here")
    p = tmp_path_factory.mktemp("txt") / "gpl.txt"
    p.write_text(GPL3.read_text()[:2600])  # ~550 tokens: four chunks of 128
    return p


@pytest.mark.slow
def test_bundled_model_against_itself(bundled_model: Path, short_text: Path) -> None:
    res = CliRunner().invoke(cli, ["eval", "ppl", str(bundled_model), "--text", str(short_text),
                                   "--ctx", "128", "--base", str(bundled_model), "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["n_chunks"] >= 3 and r["n_scored"] == r["n_chunks"] * 63
    assert 3 < r["ppl"] < 100 and 0 < r["ppl_err"] < r["ppl"] / 5
    assert r["kld_mean"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"] == 1.0
    assert r["delta_ppl"] == pytest.approx(0.0, abs=1e-6) and r["base_ppl"] == pytest.approx(r["ppl"])
    (rec,) = read_records("eval").records
    assert headline(rec) == (f"PPL {r['ppl']:.3f} ± {r['ppl_err']:.3f} ({r['n_scored']} tokens), "
                             f"KL 0.0000 vs {bundled_model.name}")


def test_eval_errors(bundled_model: Path, tmp_path: Path) -> None:
    short = tmp_path / "s.txt"
    short.write_text("Too short to score.")
    res = CliRunner().invoke(cli, ["eval", "ppl", str(bundled_model), "--text", str(short), "--ctx", "64"])
    assert res.exit_code == 2 and "needs at least 128" in res.stderr
    res = CliRunner().invoke(cli, ["eval", "ppl", str(bundled_model), "--text", str(tmp_path / "none.txt")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    make_checkpoint(tmp_path / "hf", TinySpec("bpe"))
    convert(tmp_path / "hf", tmp_path / "tiny.gguf", outtype="f16")
    short.write_text("word " * 300)
    res = CliRunner().invoke(cli, ["eval", "ppl", str(bundled_model), "--text", str(short), "--ctx", "64",
                                   "--base", str(tmp_path / "tiny.gguf"), "--threads", "1"])
    assert res.exit_code == 2 and "does not share" in res.stderr and len(res.stderr.splitlines()) == 1
