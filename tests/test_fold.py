"""edge.fold: a residual-stream edit folded into the weights, judged by llama.cpp itself.

A tiny random Llama is converted to GGUF inside the test; the folded file, run by plain
llama.cpp (no control vector), must give the logits of the numpy engine with the same edit
applied to the float32 weights, and those must equal applying the edit to what each
writer adds to the stream.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from convert_helpers import TinySpec, llama_logits, make_checkpoint

from edge.engine import Engine
from edge.errors import BadOptionError, OutputExistsError
from edge.fold import (
    FoldPlan,
    ResidualEdit,
    edit_embedding,
    edit_writer,
    fold_gguf,
    fold_weights,
    quantize_rows,
)

SPEC = TinySpec("bpe", n_embd=64, n_layers=3, n_head=4, n_head_kv=2, n_ff=128, tied=True, seed=11)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edge.convert import convert
    from edge.quantize import quantize

    d = tmp_path_factory.mktemp("fold")
    make_checkpoint(d / "hf", SPEC)
    f32 = d / "tiny.f32.gguf"
    convert(d / "hf", f32, outtype="f32")
    q8 = d / "tiny.q8.gguf"
    quantize(f32, q8, qtype="Q8_0", pure=True)
    return {"f32": f32, "q8": q8, "dir": d}


def _plan(seed: int = 0, strength: float = 1.0, bias: bool = False) -> FoldPlan:
    rng = np.random.default_rng(seed)
    d = SPEC.n_embd
    layers = {il: ResidualEdit.projection(rng.standard_normal((2, d)), strength) for il in (1, 2)}
    if bias:
        layers[2] = ResidualEdit(layers[2].u, layers[2].v, rng.standard_normal(d).astype(np.float32))
    return FoldPlan(layers, embedding=ResidualEdit.projection(rng.standard_normal(d), strength))


def _tokens(n: int = 40) -> list[int]:
    return [int(t) for t in np.random.default_rng(3).integers(3, 300, n)]


def test_projection_math() -> None:
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((3, 16))
    dirs[2] = dirs[0] + 2 * dirs[1]  # dependent: the span is 2-d
    e = ResidualEdit.projection(dirs, 1.0)
    assert e.rank == 2
    x = rng.standard_normal((5, 16))
    y = e.apply(x)
    np.testing.assert_allclose(y @ dirs.T, 0, atol=1e-10)  # nothing left along the span
    np.testing.assert_allclose(e.apply(y), y, atol=1e-12)  # a projection: idempotent
    half = ResidualEdit.projection(dirs[:1], 0.3).apply(x)
    u = dirs[0] / np.linalg.norm(dirs[0])
    np.testing.assert_allclose(half @ u, 0.7 * (x @ u), atol=1e-10)  # x − λ(dᵀx)d
    np.testing.assert_allclose(half - (half @ u)[:, None] * u, x - (x @ u)[:, None] * u, atol=1e-10)
    # folding into a writer equals editing what it writes; the embedding row by row
    w = rng.standard_normal((16, 7))
    v = rng.standard_normal(7)
    np.testing.assert_allclose(edit_writer(w, e) @ v, e.apply(w @ v), atol=1e-5)
    emb = rng.standard_normal((9, 16)).astype(np.float32)
    np.testing.assert_allclose(edit_embedding(emb, e), e.apply(emb), atol=1e-5)


def test_ggml_quantizer_matches_gguf_py_bit_for_bit() -> None:
    from gguf.quants import quantize

    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32) * 3
    ours = quantize_rows(x, int(gguf.GGMLQuantizationType.Q8_0))
    ref = quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == ref.shape
    assert (ours != ref).sum() == 0


def test_folded_f32_gguf_in_llama_cpp_equals_engine_with_the_edit(tiny: dict[str, Path]) -> None:
    plan = _plan(bias=True)
    out = tiny["dir"] / "folded.f32.gguf"
    r = fold_gguf(tiny["f32"], out, plan, weight_type="F32", force=True)
    assert r.untied_output  # the tiny model is tied: the head keeps the unedited embedding
    assert set(r.edited) == {"token_embd.weight", *(f"blk.{i}.{n}.weight" for i in (1, 2)
                                                   for n in ("attn_output", "ffn_down"))}
    base = Engine.from_gguf(tiny["f32"])
    eng = Engine(fold_weights(base.weights, plan))
    toks = _tokens()
    ctrl = plan.bias_matrix(SPEC.n_layers, SPEC.n_embd)
    ours = eng.forward(toks, control=ctrl).logits
    ref = llama_logits(out, toks)
    unedited = base.forward(toks).logits
    scale = np.abs(ref).max()
    assert np.abs(unedited - ref).max() > 0.05 * scale  # the edit matters, so agreement means something
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3 * scale)


@pytest.mark.parametrize("shared", [False, True])
def test_head_edit_in_llama_cpp_equals_engine(tiny: dict[str, Path], shared: bool) -> None:
    """The output head's rows projected: a tied head gets its own output.weight (the
    embedding unedited), or stays tied when the embedding takes the same edit."""
    rng = np.random.default_rng(4)
    e = ResidualEdit.projection(rng.standard_normal((3, SPEC.n_embd)))
    _head_matches(tiny, e, shared, f"head{int(shared)}.gguf")


def test_a_word_list_head_edit_changes_only_those_logits_in_llama_cpp(tiny: dict[str, Path]) -> None:
    """An edit of some token rows (a reversal, λ = 2, as a words ablation may ask): llama.cpp
    reads the folded file as the engine does, and every other token's logit is unchanged."""
    rng = np.random.default_rng(6)
    words = np.array([5, 17, 40, 41, 200])
    e = replace(ResidualEdit.projection(rng.standard_normal((2, SPEC.n_embd)), 2.0), rows=words)
    ref, base = _head_matches(tiny, e, False, "words.gguf")
    other = np.setdiff1d(np.arange(ref.shape[1]), words)
    np.testing.assert_allclose(ref[:, other], base[:, other], rtol=0, atol=2e-3 * np.abs(ref).max())
    assert np.abs(ref[:, words] - base[:, words]).max() > 0.05 * np.abs(ref).max()
    with pytest.raises(BadOptionError, match="row subset"):
        FoldPlan({1: e}).check(SPEC.n_layers, SPEC.n_embd)


def test_a_folded_control_vector_leaves_the_writers_and_equals_the_engines_control(tiny: dict[str, Path]) -> None:
    """Rank-0 edits are constants alone (a control vector folded in as ffn_down biases):
    no writer is re-encoded, and llama.cpp on the file equals the engine with that control."""
    rng = np.random.default_rng(8)
    vec = rng.standard_normal((SPEC.n_layers, SPEC.n_embd)).astype(np.float32)
    plan = FoldPlan({il: ResidualEdit.constant(vec[il]) for il in (1, 2)})
    out = tiny["dir"] / "cvec.gguf"
    r = fold_gguf(tiny["f32"], out, plan, weight_type="source", force=True)
    assert r.edited == [] and not r.untied_output
    names = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    src = {t.name: t for t in gguf.GGUFReader(str(tiny["f32"])).tensors}
    assert {"blk.1.ffn_down.bias", "blk.2.ffn_down.bias"} <= set(names) and "blk.0.ffn_down.bias" not in names
    assert np.array_equal(names["blk.1.ffn_down.weight"].data, src["blk.1.ffn_down.weight"].data)  # byte for byte
    toks = _tokens()
    base = Engine.from_gguf(tiny["f32"])
    ours = base.forward(toks, control=plan.bias_matrix(SPEC.n_layers, SPEC.n_embd)).logits
    ref = llama_logits(out, toks)
    scale = np.abs(ref).max()
    assert np.abs(base.forward(toks).logits - ref).max() > 0.05 * scale
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3 * scale)


def test_combo_fold_is_the_words_edit_plus_the_vector_in_one_file(tiny: dict[str, Path]) -> None:
    """combo's plan (bias.methods.combo_plan, also how benchmarks/ablation_plain.py rebuilds
    it): llama.cpp on the folded file equals the engine with the word rows edited and the
    vector applied as a control, the vector's layer-0 row left out as llama.cpp leaves it."""
    from bias.methods import combo_plan

    rng = np.random.default_rng(9)
    words = FoldPlan(output=replace(ResidualEdit.projection(rng.standard_normal((2, SPEC.n_embd))),
                                    rows=np.array([5, 17, 40])))
    vec = rng.standard_normal((SPEC.n_layers, SPEC.n_embd)).astype(np.float32)
    plan = combo_plan(words, vec)
    assert set(plan.layers) == {1, 2} and plan.output is words.output
    out = tiny["dir"] / "combo.gguf"
    fold_gguf(tiny["f32"], out, plan, weight_type="F32", force=True)
    toks = _tokens()
    base = Engine.from_gguf(tiny["f32"])
    control = vec.copy()
    control[0] = 0
    ours = Engine(fold_weights(base.weights, words)).forward(toks, control=control).logits
    ref = llama_logits(out, toks)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3 * scale)
    for partial in (Engine(fold_weights(base.weights, words)).forward(toks).logits,
                    base.forward(toks, control=control).logits):
        assert np.abs(partial - ref).max() > 0.02 * scale  # both parts are in the file (10× the tolerance)


def _head_matches(tiny: dict[str, Path], e: ResidualEdit, shared: bool, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Fold e into the head (and the embedding if shared); llama.cpp's logits on the file
    must equal the engine's with the edit, and differ from the unedited model's."""
    plan = FoldPlan(embedding=e if shared else None, output=e)
    out = tiny["dir"] / name
    r = fold_gguf(tiny["f32"], out, plan, weight_type="F32", force=True)
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert ("output.weight" in names) is (not shared) and r.untied_output is (not shared)
    assert set(r.edited) == ({"token_embd.weight"} if shared else {"output.weight"})
    base = Engine.from_gguf(tiny["f32"])
    toks = _tokens()
    ours = Engine(fold_weights(base.weights, plan)).forward(toks).logits
    ref = llama_logits(out, toks)
    scale = np.abs(ref).max()
    unedited = base.forward(toks).logits
    assert np.abs(unedited - ref).max() > 0.05 * scale
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3 * scale)
    return ref, unedited


def test_requantized_fold_keeps_types_and_copies_the_rest(tiny: dict[str, Path]) -> None:
    plan = _plan(seed=2, strength=0.8)
    out = tiny["dir"] / "folded.q8.gguf"
    r = fold_gguf(tiny["q8"], out, plan, weight_type="source", force=True)
    src = {t.name: t for t in gguf.GGUFReader(str(tiny["q8"])).tensors}
    got = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert set(got) == set(src) | {"output.weight"}
    for name, t in src.items():
        assert got[name].tensor_type == t.tensor_type, name
        if name not in r.edited:
            assert np.array_equal(np.asarray(got[name].data), np.asarray(t.data)), name
    assert np.array_equal(np.asarray(got["output.weight"].data), np.asarray(src["token_embd.weight"].data))
    assert r.worst is not None and 0 < r.worst.max_err < 0.01  # Q8_0: ≤ 1/255 of the range, plus rounding
    # llama.cpp runs it; it is the f32 fold up to Q8_0 rounding, and far from the unedited model
    full = tiny["dir"] / "folded.ref.gguf"
    fold_gguf(tiny["f32"], full, plan, weight_type="F32", force=True)
    toks = _tokens()
    q, f, u = llama_logits(out, toks), llama_logits(full, toks), llama_logits(tiny["q8"], toks)
    assert np.abs(q - f).mean() < 0.25 * np.abs(u - f).mean()


def test_an_edited_only_f16_fold_keeps_the_source_and_holds_the_edit_unquantized(tiny: dict[str, Path]) -> None:
    # what a split run scores a fold on: the compute file's own tensors, the edited ones at F16
    plan = _plan(seed=2, strength=0.8)
    out = tiny["dir"] / "folded.f16e.gguf"
    r = fold_gguf(tiny["q8"], out, plan, weight_type="F16-edited", force=True)
    src_reader, got_reader = gguf.GGUFReader(str(tiny["q8"])), gguf.GGUFReader(str(out))
    src = {t.name: t for t in src_reader.tensors}
    got = {t.name: t for t in got_reader.tensors}
    assert set(got) == set(src) | {"output.weight"} and r.untied_output
    F16, Q8 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    assert sorted(r.edited) == sorted(n for n in got if got[n].tensor_type == F16)
    for name, t in src.items():
        if name not in r.edited:
            assert got[name].tensor_type == t.tensor_type, name
            assert np.array_equal(np.asarray(got[name].data), np.asarray(t.data)), name
    assert got["output.weight"].tensor_type == Q8  # the head reads the unedited embedding, copied
    ftype = gguf.Keys.General.FILE_TYPE
    assert got_reader.fields[ftype].contents() == src_reader.fields[ftype].contents()
    # an edited writer is the edit of the q8 weights, to F16 rounding
    from gguf.quants import dequantize

    t = src["blk.1.attn_output.weight"]
    x = dequantize(np.asarray(t.data), t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
    want = edit_writer(x.astype(np.float32), plan.layers[1])
    back = np.asarray(got["blk.1.attn_output.weight"].data, dtype=np.float32).reshape(want.shape)
    np.testing.assert_allclose(back, want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert np.abs(back - x).max() > 0.01 * np.abs(x).max()  # and the edit is there
    # llama.cpp runs it, and it carries the edit: nearer the f32 fold than the unedited file
    full = tiny["dir"] / "folded.ref2.gguf"
    fold_gguf(tiny["f32"], full, plan, weight_type="F32", force=True)
    toks = _tokens()
    e, f, u = llama_logits(out, toks), llama_logits(full, toks), llama_logits(tiny["q8"], toks)
    assert np.abs(e - f).mean() < 0.25 * np.abs(u - f).mean()


def test_bad_plans_and_outputs_are_refused(tiny: dict[str, Path]) -> None:
    e = ResidualEdit.projection(np.ones(SPEC.n_embd))
    with pytest.raises(BadOptionError, match="layer 7"):
        fold_gguf(tiny["f32"], tiny["dir"] / "x.gguf", FoldPlan({7: e}))
    with pytest.raises(BadOptionError, match="n_embd"):
        fold_gguf(tiny["f32"], tiny["dir"] / "x.gguf", FoldPlan({0: ResidualEdit.projection(np.ones(8))}))
    with pytest.raises(BadOptionError, match="bias"):
        FoldPlan(embedding=ResidualEdit(e.u, e.v, np.ones(SPEC.n_embd, np.float32))).check(3, SPEC.n_embd)
    with pytest.raises(OutputExistsError):
        fold_gguf(tiny["f32"], tiny["q8"], FoldPlan({0: e}))
    assert not (tiny["dir"] / "x.gguf").exists()


def test_hidden_states_from_llama_cpp_equal_the_engine(tiny: dict[str, Path]) -> None:
    from edge.hidden import HiddenStates

    eng = Engine.from_gguf(tiny["f32"])
    texts = [_tokens(n)[: n] for n in (5, 17, 9)]
    texts = [[1, *t] for t in texts]
    with HiddenStates(tiny["f32"], threads=1, n_batch=32) as hs:  # 32 rows: two decodes
        got = hs.token_means(texts)
    for t, g in zip(texts, got, strict=True):
        ref = eng.forward(t, return_hidden=True).hidden[:, 1:].mean(axis=1)
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    assert np.abs(got[0] - got[1]).max() > 0.1  # texts do not leak into each other's rows


def test_requant_cost_is_zero_against_itself_and_positive_against_q8(tiny: dict[str, Path]) -> None:
    from edge.fold import requant_cost

    plan = _plan(seed=4, strength=0.8)
    full, q8 = tiny["dir"] / "cost.f32.gguf", tiny["dir"] / "cost.q8.gguf"
    fold_gguf(tiny["f32"], full, plan, weight_type="F32", force=True)
    fold_gguf(tiny["q8"], q8, plan, weight_type="source", force=True)
    text = " ".join(f"word{i % 97} and more text {i}" for i in range(300))
    same = requant_cost(full, full, text, n_ctx=64, max_chunks=2, threads=1)
    cost = requant_cost(full, q8, text, n_ctx=64, max_chunks=2, threads=1)
    assert same["tokens"] > 0 and same["kl_mean"] == pytest.approx(0, abs=1e-6)
    assert same["ppl_full"] == pytest.approx(same["ppl_quantized"])
    assert 0 < cost["kl_mean"] < 0.05 and cost["top1_agreement"] > 0.8
