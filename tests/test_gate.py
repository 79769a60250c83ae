"""Gated per-category pushes (bias.gate, `edge bias mitigate --method gate`): the edit each
writer gets, the gates' construction, the common scale's search, and one run on the bundled
model."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from bias.gate import (
    GateConfig,
    GateEdits,
    ScaleStep,
    best_step,
    depth_profile,
    gate_edits,
    next_scale,
    signed,
    writes,
)
from bias.shared import PairStates


def _edits(k: int = 2, d: int = 6, rng: np.random.Generator | None = None) -> GateEdits:
    rng = rng or np.random.default_rng(0)
    return GateEdits([f"c{i}" for i in range(k)], np.ones(k), [1, 3],
                     rng.normal(size=(k, 2, d)).astype(np.float32), rng.normal(size=(k, 2, d)).astype(np.float32))


def test_plan_adds_each_push_times_its_gate_and_leaves_other_layers() -> None:
    e = _edits()
    a = np.array([0.5, -2.0])
    plan = e.plan(a)
    assert sorted(plan.layers) == [1, 3] and plan.embedding is None and plan.output is None
    x = np.random.default_rng(1).normal(size=6)
    for j, il in enumerate(e.layers):
        want = x + sum(a[c] * e.u[c, j] * float(e.v[c, j] @ x) for c in range(2))
        np.testing.assert_allclose(plan.layers[il].apply(x), want, rtol=1e-5, atol=1e-5)
    assert not e.plan([0.0, 0.0]).layers  # nothing to fold
    assert plan.layers[1].rank == 2 and e.one(1).layers[3].rank == 1


def _states(rng: np.random.Generator, n_per: int = 30, n_layers: int = 6, d: int = 16):
    """Pairs of two categories: each category's sentences carry their own offset (what a gate
    should read) on top of a shared one (what every social sentence carries)."""
    cats = np.array(["a"] * n_per + ["b"] * n_per)
    off = {"a": rng.normal(size=d) * 2, "b": rng.normal(size=d) * 2}
    common = rng.normal(size=d) * 3
    h = rng.normal(size=(2 * n_per, n_layers, d)) + common
    for i, c in enumerate(cats):
        h[i] += off[c] * np.arange(1, n_layers + 1)[:, None]
    bias = rng.normal(size=d)
    st = PairStates((h + bias).astype(np.float32), h.astype(np.float32),
                    np.zeros((2 * n_per, d), np.float32), np.zeros((2 * n_per, d), np.float32))
    neutral = rng.normal(size=(80, n_layers, d)).astype(np.float32)
    return st, cats, neutral


def test_gates_open_on_their_own_category_not_on_others_or_neutral_text() -> None:
    rng = np.random.default_rng(2)
    st, cats, neutral = _states(rng)
    cfg = GateConfig(min_pairs=5, protect=2, profile=(0.0, 1.0, 1.0))
    e = gate_edits(st, cats, neutral, cfg)
    assert e.names == ["a", "b"] and e.layers == [il for il in range(1, 6) if depth_profile(6, cfg.profile)[il] > 0]
    w = np.concatenate([writes(st.h_more, st.e_more), writes(st.h_less, st.e_less)])
    wc = np.concatenate([cats, cats])
    wn = writes(neutral, np.zeros_like(neutral[:, 0]))
    size = np.linalg.norm((st.h_more - st.h_less).mean(0), axis=1) * depth_profile(6, cfg.profile)
    for j, c in enumerate(e.names):
        for k, il in enumerate(e.layers):
            v, u = e.v[j, k], e.u[j, k]
            assert abs(np.linalg.norm(v) - 1) < 1e-5
            assert abs(float(wn[:, il].mean(0) @ v)) < 1e-4  # neutral text: closed on average
            assert abs(float(w[wc != c, il].mean(0) @ v)) < 1e-4  # the other category: closed
            g = float((w[wc == c, il] @ v).mean())
            assert g > 0.5
            # on its own sentences the mean push is the layer's size
            assert np.linalg.norm(u) * g == pytest.approx(size[il], rel=1e-3)
    # signs: a category whose calibration mean is anti-stereotypical is pushed up
    s = signed(e, np.array([1.0] * 30 + [-1.0] * 30), cats)
    assert s.signs.tolist() == [1.0, -1.0]
    np.testing.assert_allclose(s.u[1], -e.u[1])


def test_scale_steps_toward_the_pct_target_within_the_ppl_budget() -> None:
    cfg = GateConfig(pct_target=50.0, max_ppl_increase=0.02)
    # pct 56 → 53 at scale 1: a secant step aims at 50 (scale 2)
    assert next_scale([ScaleStep(1.0, 53.0, 0.001, 0.0)], 56.0, cfg) == pytest.approx(2.0)
    # never more than doubled, never below a quarter
    assert next_scale([ScaleStep(1.0, 55.9, 0.001, 0.0)], 56.0, cfg) == pytest.approx(2.0)
    assert next_scale([ScaleStep(1.0, 55.0, 0.5, 0.0)], 56.0, cfg) == pytest.approx(0.25)
    # over the PPL budget: cut to what PPL ~ scale² allows, even if the pct wants more
    s = next_scale([ScaleStep(1.0, 54.0, 0.04, 0.0)], 56.0, cfg)
    assert s == pytest.approx(np.sqrt(0.95 * 0.02 / 0.04))
    # close enough, or past the target, within budget: stop
    assert next_scale([ScaleStep(2.0, 50.4, 0.01, 0.0)], 56.0, cfg) is None
    assert next_scale([ScaleStep(2.0, 47.0, 0.01, 0.0)], 56.0, cfg) is None
    steps = [ScaleStep(1.0, 53.0, 0.005, 0.0), ScaleStep(2.0, 50.2, 0.03, 0.0), ScaleStep(1.6, 51.0, 0.015, 0.0),
             ScaleStep(1.8, 49.9, 0.018, 0.0)]
    assert best_step(steps, cfg) is steps[3]  # 50.2 is over budget; 49.9 beats 51.0
    near = [ScaleStep(1.7, 50.3, 0.016, 0.0), ScaleStep(1.8, 49.9, 0.018, 0.0)]
    assert best_step(near, cfg) is near[0]  # within 0.5 above the target beats just past it
    assert best_step([ScaleStep(1.0, 53.0, 0.05, 0.0)], cfg) is None  # nothing within budget


@pytest.mark.slow
def test_gate_on_the_bundled_model_folds_a_model_plain_llama_cpp_runs(tmp_path: Path) -> None:
    import llama_cpp

    from bias.methods import mitigate_splits
    from bias.splits import SplitsConfig

    out = tmp_path / "fair.gguf"
    # 36 calibration rows: 3 categories with ≥ 5 pairs, so 3 edits to measure
    cfg = SplitsConfig(n_splits=1, methods=("gate",), repeat=0, probes_spec=None, calib_limit=36,
                       heldout_limit=40, output=str(out), max_ppl_increase=0.05, weights="F16", ppl_tokens=512)
    # one scale measurement (~20 s here): choosing among steps is test_scale_steps'; the
    # re-quantized deploy (shared with ablate) is test_mitigate_splits'
    gate = GateConfig(min_pairs=5, max_steps=1, neutral_windows=64)
    res = mitigate_splits(None, "probes", tmp_path / "rep", cfg=cfg, gate=gate, threads=2)
    r = res.to_dict()["splits"][0]["methods"]["gate"]
    fit = r["fit"]
    assert fit["categories"] == ["disability", "gender", "religion"] and set(fit["signs"]) <= {-1.0, 1.0}
    assert len(set(fit["coefficients"])) == 1 and fit["scale"] in [s["scale"] for s in fit["steps"]]
    assert len(fit["steps"]) == 1 and fit["scale"] == 1.0
    chosen = next(s for s in fit["steps"] if s["scale"] == fit["scale"])
    assert chosen["ppl_increase"] <= 0.05 and r["ppl"]["increase"] == pytest.approx(chosen["ppl_increase"])
    ch = r["heldout"]["pct_stereotype"]["change"]
    assert ch["lo"] <= ch["value"] <= ch["hi"]
    # -o: the gated model, an ordinary llama GGUF
    assert r["fit"]["fold"]["path"] == str(out) and r["fit"]["fold"]["weight_type"] == "F16"
    rd = gguf.GGUFReader(str(out))
    assert rd.fields["general.architecture"].contents() == "llama"
    assert {f"blk.{il}.ffn_down.weight" for il in fit["layers"]} <= {t.name for t in rd.tensors}
    # plain llama.cpp runs it, and the edit changes what it predicts
    src = Path(json.loads((tmp_path / "rep" / "results.json").read_text())["shared"]["model"])
    lps = []
    for p in (src, out):
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
        toks = [llm.token_bos(), *llm.tokenize(b"The old man could not use the phone because he was", add_bos=False)]
        llm.eval(toks)
        lps.append(np.asarray(llm.scores[len(toks) - 1], np.float64))
        llm.close()
    assert np.all(np.isfinite(lps[1])) and not np.allclose(lps[0], lps[1], atol=1e-3)
