"""The contrast eraser (bias.erase, `edge bias mitigate --method erase`)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from bias.erase import ContrastAxes, EraseConfig, aligned_differences
from edge.errors import BadOptionError
from edge.fold import edit_embedding


def _synthetic(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Neutral states with unit variance but on axis b (0.1) and axis c (10); pair
    differences as large along a, b and c. The eraser's axes should be b first (most
    contrast for least neutral variance), then a; c last of the three."""
    d, a, b, c = 24, 3, 7, 11
    sd = np.ones(d)
    sd[b], sd[c] = np.sqrt(0.1), np.sqrt(10.0)
    neutral = rng.normal(size=(6000, d)) * sd
    delta = rng.normal(size=(3000, d)) * 0.05
    delta[:, [a, b, c]] += rng.normal(size=(3000, 3)) * 2.0
    return neutral, delta, a, b, c


def test_axes_take_the_contrast_text_uses_least() -> None:
    neutral, delta, a, b, c = _synthetic(np.random.default_rng(0))
    ax = ContrastAxes.fit(delta, neutral, ridge=0.0)
    for k, want in ((0, b), (1, a)):  # in the whitened space; as a direction of h the same axis
        v = ax.s_inv @ ax.u[:, k]
        assert abs(v[want]) / np.linalg.norm(v) > 0.99
    assert ax.share(2) > 0.9 > ax.share(1)
    for form in ("orth", "oblique"):
        A, B = ax.maps(2, form)
        erased = delta - delta @ B @ A.T
        # both forms take a and b out of the differences, and c (kept) with them only a little
        assert np.abs(erased[:, [a, b]]).std() < 0.1 * np.abs(delta[:, [a, b]]).std()
        assert np.abs(erased[:, c]).std() > 0.9 * np.abs(delta[:, c]).std()
        moved = neutral @ B @ A.T
        assert (moved ** 2).sum(1).mean() < 0.1 * (neutral ** 2).sum(1).mean()


def test_head_edit_is_the_eraser_on_logits() -> None:
    rng = np.random.default_rng(1)
    neutral, delta, *_ = _synthetic(rng)
    ax = ContrastAxes.fit(delta, neutral)
    w = rng.normal(size=(50, neutral.shape[1])).astype(np.float32)  # a head of 50 tokens
    h = neutral[:5]
    for form in ("orth", "oblique"):
        A, B = ax.maps(3, form)
        w2 = edit_embedding(w, ax.head_edit(3, form, 0.7))
        np.testing.assert_allclose(h @ w2.T, (h - 0.7 * (h @ B) @ A.T) @ w.T, rtol=1e-4, atol=1e-4)
    A, B = ax.maps(3, "orth")
    np.testing.assert_allclose(A, B)  # orth: a projection, applied twice as once
    np.testing.assert_allclose(A.T @ A, np.eye(3), atol=1e-10)


def test_aligned_differences_are_read_where_the_shared_tokens_are_predicted() -> None:
    more, less = [1, 5, 6, 9, 10, 11], [1, 7, 9, 10, 11]  # "5 6" rewritten as "7"
    hm = np.arange(len(more))[:, None] * np.ones((1, 4))
    hl = 100 + np.arange(len(less))[:, None] * np.ones((1, 4))
    (d,) = aligned_differences([hm], [hl], [more], [less])
    # 9, 10, 11 are predicted by more's states 2, 3, 4 and less's 1, 2, 3
    np.testing.assert_array_equal(d[:, 0], [2 - 101, 3 - 102, 4 - 103])
    with pytest.raises(BadOptionError, match="--erase-form"):
        EraseConfig(form="sideways").validate()


@pytest.mark.slow
def test_erase_on_the_bundled_model_folds_the_eraser_into_the_head(tmp_path: Path) -> None:
    import llama_cpp

    from bias.methods import mitigate_splits
    from bias.splits import SplitsConfig

    out = tmp_path / "fair.gguf"
    cfg = SplitsConfig(n_splits=1, methods=("erase",), repeat=0, probes_spec=None, calib_limit=40,
                       heldout_limit=40, output=str(out), max_ppl_increase=0.02, weights="F16", ppl_tokens=512)
    res = mitigate_splits(None, "probes", tmp_path / "rep", cfg=cfg, erase=EraseConfig(rank=8), threads=2)
    r = res.to_dict()["splits"][0]["methods"]["erase"]
    fit = r["fit"]
    assert fit["aligned_states"] > 40 and fit["neutral_states"] > 4000 and 0 < fit["share_of_contrast"] < 1
    assert fit["tries"][-1]["ppl_increase"] <= 0.02 and r["ppl"]["increase"] == pytest.approx(
        fit["tries"][-1]["ppl_increase"])
    # -o: an ordinary llama GGUF whose head is its own tensor now, the rest as it was
    src = Path(json.loads((tmp_path / "rep" / "results.json").read_text())["shared"]["model"])
    rs, ro = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert {t.name for t in ro.tensors} == {t.name for t in rs.tensors} | {"output.weight"}
    assert fit["fold"]["edited"] == ["output.weight"]
    # plain llama.cpp on the file computes the eraser: W (h − λ A Bᵀ h), h its own final state
    # and W the embedding the source's head was tied to
    e = np.load(tmp_path / "rep" / "split0" / "erase_edit.npz")
    t = next(t for t in ro.tensors if t.name == "token_embd.weight")
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, t.shape[0]).astype(np.float64)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    toks = [llm.token_bos(), *llm.tokenize(b"The old man could not use the phone because he was", add_bos=False)]
    llm.eval(toks)
    got = np.asarray(llm.scores[len(toks) - 1], np.float64)
    llm.close()
    from edge.hidden import HiddenStates

    with HiddenStates(out) as hs:
        (h,) = hs.head_inputs([toks])
    x = h[-1].astype(np.float64)
    want = (x - float(e["strength"]) * (x @ e["b"]) @ e["a"].T) @ w.T
    assert np.abs(got - want).max() < 0.05  # F16 arithmetic
    assert np.abs(want - x @ w.T).max() > 1.0  # and the eraser moved the logits
