"""bias.ablate / bias.judge / bias.splits: direction and projection math, per-pair
diagnostics, the LEACE eraser, the loop's choices, the split machinery and its summary —
on hand-built numbers (the folded model itself is tested in test_fold.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bias import metrics as M
from bias.ablate import (
    AblateConfig,
    AblationSpec,
    balanced,
    category_rms,
    compute_directions,
    leace_edit,
    make_plan,
    pair_diagnostics,
    run_ablate_loop,
)
from bias.judge import judge, judge_pair_rows
from bias.splits import Correction, SplitsConfig, run_splits, summarize
from bias.suites import PairItem, Suite

L, D = 4, 8


def _states(n: int = 60, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    hm = rng.standard_normal((n, L, D))
    hl = hm.copy()
    hm[:, :, 0] += 1.0  # category a: the stereotype adds +1 along axis 0
    hm[n // 2:, :, 0] -= 1.0
    hm[n // 2:, :, 1] -= 2.0  # category b: −2 along axis 1 instead
    em, el = hm[:, 0] * 0.5, hl[:, 0] * 0.5
    return hm, hl, em, el


def test_directions_per_category_and_overall() -> None:
    hm, hl, em, el = _states()
    cats = ["a"] * 30 + ["b"] * 30
    over = compute_directions(hm, hl, em, el, protect=0)
    per = compute_directions(hm, hl, em, el, cats, protect=0)
    assert over.labels == ["all"] and per.labels == ["a", "b"] and per.counts == [30, 30]
    np.testing.assert_allclose(per.layers[2, 0], np.eye(D)[0], atol=1e-6)
    np.testing.assert_allclose(per.layers[2, 1], -2 * np.eye(D)[1], atol=1e-6)
    np.testing.assert_allclose(over.layers[2], [[0.5, -1, 0, 0, 0, 0, 0, 0]], atol=1e-6)
    few = compute_directions(hm, hl, em, el, ["a"] * 55 + ["b"] * 5, min_pairs=12, protect=0)
    assert not few.layers[:, 1].any()  # 5 pairs make no direction
    # per category, λ = 1 removes both categories' differences at every edited layer
    plan = make_plan(per, AblationSpec((1, 2), 1.0, embedding=True))
    assert set(plan.layers) == {1, 2} and plan.embedding is not None
    diff = hm[:, 2] - hl[:, 2]
    np.testing.assert_allclose(plan.layers[2].apply(diff), 0, atol=1e-9)
    # the overall direction leaves what the categories disagree on
    left = make_plan(over, AblationSpec((2,), 1.0)).layers[2].apply(diff)
    assert np.abs(left).max() > 0.5
    # one layer's directions on every writer (the stream never carries them)
    single = make_plan(per, AblationSpec((0, 1, 2, 3), 0.5, source_layer=3))
    assert single.layers[0] is single.layers[3] and single.embedding is single.layers[0]
    with pytest.raises(Exception, match="strength"):
        make_plan(per, AblationSpec((1,), 1.5))


def test_balanced_direction_weighs_every_category_the_same() -> None:
    hm, hl, em, el = _states(n=120)
    cats = ["a"] * 100 + ["b"] * 20  # the overall mean is a's; the balanced one is not
    hm[100:] = hl[100:]
    hm[100:, :, 1] -= 2.0
    hm[:100] = hl[:100]
    hm[:100, :, 0] += 1.0
    per = compute_directions(hm, hl, em, el, cats, protect=0)
    b = balanced(per, hm, hl)
    assert b.labels == ["balanced"] and b.counts == [120] and b.layers.shape == (L, 1, D)
    np.testing.assert_allclose(b.layers[2, 0], [0.5, -1, 0, 0, 0, 0, 0, 0], atol=1e-6)
    over = compute_directions(hm, hl, em, el, protect=0)
    assert abs(over.layers[2, 0, 0]) > 2 * abs(over.layers[2, 0, 1])  # a's, 100 of 120 pairs
    assert b.snr.shape == (L, 1) and (b.snr > 0).all()
    # a category too small for its own direction does not enter the mean
    few = balanced(compute_directions(hm, hl, em, el, cats, min_pairs=30, protect=0), hm, hl)
    np.testing.assert_allclose(few.layers[2, 0], np.eye(D)[0], atol=1e-6)
    with pytest.raises(Exception, match="calib-frac"):
        balanced(compute_directions(hm, hl, em, el, cats, min_pairs=500, protect=0), hm, hl)
    # --ablate-where shared: this direction out of what layers 1.. write, embedding untouched
    cfg = AblateConfig.targets("head,shared")
    assert cfg.candidates == (("category", "head"), ("balanced", "shared"))
    spec = cfg.spec("shared", L)
    assert spec.layers == (1, 2, 3) and not spec.embedding and not spec.head
    plan = make_plan(b, spec)
    assert set(plan.layers) == {1, 2, 3} and plan.embedding is None and plan.output is None
    np.testing.assert_allclose(plan.layers[2].apply(b.layers[2]), 0, atol=1e-6)


def test_head_directions_come_from_the_head_rows_and_edit_only_the_head() -> None:
    hm, hl, em, el = _states()
    cats = ["a"] * 30 + ["b"] * 30
    tied = compute_directions(hm, hl, em, el, cats, protect=0)
    assert tied.head is not None
    np.testing.assert_allclose(tied.head, tied.embedding)  # a tied head reads the embedding's rows
    rng = np.random.default_rng(9)
    om = rng.standard_normal(em.shape)
    ol = om.copy()
    ol[:30, 3] -= 1.5  # an untied head: category a's group words differ along axis 3 there
    untied = compute_directions(hm, hl, em, el, cats, protect=0, head=(om, ol))
    np.testing.assert_allclose(untied.head[0], 1.5 * np.eye(D)[3], atol=1e-9)
    assert not untied.head[1].any()
    plan = make_plan(untied, AblationSpec((), 1.0, embedding=False, head=True))
    assert not plan.layers and plan.embedding is None and plan.output is not None
    assert plan.output.rank == 1  # category b has no head contrast: only a's direction
    np.testing.assert_allclose(plan.output.apply(om[:30] - ol[:30]), 0, atol=1e-9)
    assert "output head" in AblationSpec((), 0.5, embedding=False, head=True).describe()


def test_words_ablation_edits_the_group_words_rows_and_round_trips(tmp_path: Path) -> None:
    from dataclasses import replace

    from bias.ablate import BiasDirections, group_tokens

    def tok(text: str) -> list[int]:
        return [ord(c) for c in text]

    # what one sentence has and the other has not, with multiplicity ("aab" vs "ab": one a)
    # a difference token counts with multiplicity; one that mostly sits in the shared part
    # of the pairs (z: 1 of its 5 occurrences differs) is a function word, not a group word
    pairs = [("xaz", "xbz"), ("zz", "z")]
    assert group_tokens(tok, pairs).tolist() == [ord("a"), ord("b")]
    assert group_tokens(tok, pairs, min_share=0.2).tolist() == [ord("a"), ord("b"), ord("z")]
    hm, hl, em, el = _states()
    d = compute_directions(hm, hl, em, el, ["a"] * 30 + ["b"] * 30, protect=0)
    spec = AblationSpec((), 1.6, embedding=False, head=True, words=True)
    with pytest.raises(Exception, match="token ids"):
        make_plan(d, spec)
    d = replace(d, head_rows=np.array([2, 7]))
    plan = make_plan(d, spec)
    assert plan.output is not None and plan.output.rows.tolist() == [2, 7] and not plan.layers
    assert "group words" in spec.describe()
    with pytest.raises(Exception, match="strength"):  # past 1 only for the words' rows
        make_plan(d, replace(spec, words=False))
    # the loop starts a words candidate at its own strength (here past 1)
    cfg = AblateConfig.targets("words,head")
    assert [w for _, w in cfg.candidates] == ["words", "head"] and cfg.spec("words", L).strength == 1.0
    assert [w for _, w in AblateConfig.targets("both").candidates] == ["head", "stream"]
    with pytest.raises(Exception, match="ablate-where"):
        AblateConfig.targets("lips")
    calls: list[float] = []

    def measure(sp: AblationSpec, dd: object, pairs: bool) -> tuple[np.ndarray | None, np.ndarray | None, float, float]:
        calls.append(sp.strength)
        ll = np.zeros(60)
        return (ll + 0.1 if pairs else None), (ll if pairs else None), 10 * (1 + 0.04 * (sp.strength / 2) ** 2), 0.0

    base = (np.r_[np.ones(30), -np.ones(30)], np.zeros(60))
    res = run_ablate_loop({"category": d}, base, 10.0, ["a"] * 30 + ["b"] * 30, measure,
                          AblateConfig(candidates=(("category", "words"),), words_strength=2.0))
    # the PPL probe at λ = 2 (+4%), then the pairs at 2·√(0.95·0.02/0.04)
    assert calls == [2.0, pytest.approx(2 * np.sqrt(0.95 * 0.02 / 0.04), abs=1e-3)]
    assert res.best is not None and res.best.spec.words
    d.save(tmp_path / "d.npz", spec)
    back, spec2 = BiasDirections.load(tmp_path / "d.npz")
    assert spec2 == spec and back.head_rows.tolist() == [2, 7] and back.labels == d.labels
    np.testing.assert_allclose(make_plan(back, spec2).output.u, plan.output.u)


def test_directions_avoid_the_streams_massive_axis() -> None:
    hm, hl, em, el = _states()
    hm, hl = hm.copy(), hl.copy()
    hm[:, :, 7] += 300.0 + 3.0  # a massive dimension the stereotype also nudges
    hl[:, :, 7] += 300.0
    raw = compute_directions(hm, hl, em, el, protect=0)
    prot = compute_directions(hm, hl, em, el, protect=1)
    assert abs(raw.layers[2, 0, 7]) > 2.5
    assert abs(prot.layers[2, 0, 7]) < 0.01  # from 3.0: the massive axis is left alone
    np.testing.assert_allclose(prot.layers[2, 0, :2], raw.layers[2, 0, :2], atol=0.05)


def test_leace_edit_equalises_class_means() -> None:
    rng = np.random.default_rng(2)
    cov = rng.standard_normal((D, D))
    a = rng.standard_normal((200, D)) @ cov + 0.7
    b = rng.standard_normal((200, D)) @ cov
    e = leace_edit(a, b, shrink=0.0)
    np.testing.assert_allclose(e.apply(a).mean(0), e.apply(b).mean(0), atol=1e-9)
    # oblique: it moves x along δ only
    delta = a.mean(0) - b.mean(0)
    moved = e.apply(a) - a
    cos = np.abs(moved @ delta) / (np.linalg.norm(moved, axis=1) * np.linalg.norm(delta))
    np.testing.assert_allclose(cos, 1, atol=1e-9)


def test_pair_diagnostics_tell_shrink_from_shift() -> None:
    rng = np.random.default_rng(3)
    less = rng.standard_normal(500) * 3
    more = less + rng.standard_normal(500) * 5 + 0.5
    d0 = more - less
    shift = pair_diagnostics((more, less), (more - 0.3, less))
    assert abs(shift.slope) < 1e-9 and abs(shift.mean_change + 0.3) < 1e-9 and shift.sd_change < 1e-9
    shrink = pair_diagnostics((more, less), (less + 0.6 * d0, less))
    assert shrink.slope == pytest.approx(-0.4) and shrink.corr == pytest.approx(-1.0)
    assert shrink.flips_to_anti == shrink.flips_to_stereo == 0
    flip = pair_diagnostics((np.array([1.0, -1.0]), np.zeros(2)), (np.array([-1.0, 1.0]), np.zeros(2)))
    assert (flip.flips_to_anti, flip.flips_to_stereo) == (1, 1)


def test_category_rms_does_not_let_categories_cancel() -> None:
    more = np.array([1.0, 1.0, -1.0, -1.0])
    less = np.zeros(4)
    assert M.mean_ll_diff(more, less) == 0
    assert category_rms(more, less, ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert category_rms(more, less, ["a"] * 4) == 0


def test_judge_flags_and_power_line() -> None:
    rng = np.random.default_rng(4)
    less = np.zeros(400)
    more = rng.standard_normal(400) + 0.3  # biased: mean 0.3, SD 1 → SE 0.05
    j = judge(M.mean_ll_diff, (more, less), (more - 0.3, less), neutral=0.0, n_boot=400)
    assert j.excluded_before and j.contains_after and j.toward_neutral and not j.away_from_neutral
    assert j.power == pytest.approx(2.8 * 0.05, rel=0.2)
    worse = judge(M.mean_ll_diff, (more, less), (more + 0.5, less), neutral=0.0, n_boot=400)
    assert worse.away_from_neutral and not worse.toward_neutral
    # pushed past neutral to a larger bias the other way: worse, though its sign says "toward"
    over = judge(M.mean_ll_diff, (more, less), (more - 0.8, less), neutral=0.0, n_boot=400)
    assert over.change.hi < 0 and over.overshot and over.away_from_neutral and not over.toward_neutral
    # past neutral but smaller than before, or not significantly the other way: not overshot
    for shift in (0.5, 0.33):
        j = judge(M.mean_ll_diff, (more, less), (more - shift, less), neutral=0.0, n_boot=400)
        assert not j.overshot and j.toward_neutral and not j.away_from_neutral
    cats = ["a"] * 200 + ["b"] * 200
    pj = judge_pair_rows((more, less), (more * 0.2, less), cats, n_boot=200)
    moves = pj.category_moves()
    assert set(moves["biased_before"]) == set(moves["moved_toward_neutral"]) and not moves["made_worse"]
    assert set(moves["closer"]) == set(moves["biased_before"])
    # "a" nudged 0.03 toward 0, "b" 0.03 away, each under per-pair noise of mean exactly 0
    # (SD 1: the change's SE ~0.07): "a" is nearer by its point estimate, not moved
    # significantly; "b" is neither nearer nor significantly worse
    noise = rng.standard_normal((2, 200))
    noise -= noise.mean(axis=1, keepdims=True)
    nudged = more + np.concatenate([-0.03 + noise[0], 0.03 + noise[1]])
    m2 = judge_pair_rows((more, less), (nudged, less), cats, n_boot=200).category_moves()
    assert set(m2["biased_before"]) == {"a", "b"}
    assert m2["closer"] == ["a"] and m2["moved_toward_neutral"] == [] and m2["made_worse"] == []


def test_loop_scales_each_candidate_into_budget_and_keeps_the_better() -> None:
    hm, hl, em, el = _states()
    cats = ["a"] * 30 + ["b"] * 30
    dirs = {"overall": compute_directions(hm, hl, em, el, protect=0),
            "category": compute_directions(hm, hl, em, el, cats, protect=0)}
    rng = np.random.default_rng(5)
    less = rng.standard_normal(60)
    d0 = np.where(np.arange(60) < 30, 1.0, -2.0) + rng.standard_normal(60) * 0.1
    calls: list[tuple[str, float, bool]] = []

    def measure(spec: AblationSpec, d: object, pairs: bool) -> tuple[np.ndarray | None, np.ndarray | None, float, float]:
        cat = d is dirs["category"]
        calls.append(("category" if cat else "overall", spec.strength, pairs))
        keep = 1 - spec.strength * (0.9 if cat else 0.3)  # category shrinks more...
        rise = (0.08 if cat else 0.01) * spec.strength ** 2  # ...but costs more PPL: +8% at λ = 1
        m = less + keep * d0 if pairs else None
        return m, less if pairs else None, 10 * (1 + rise), 0.01

    cfg = AblateConfig(max_ppl_increase=0.02, candidates=(("category", "stream"), ("overall", "stream")))
    res = run_ablate_loop(dirs, (less + d0, less), 10.0, cats, measure, cfg)
    # a PPL probe at λ = 1, then the pairs at √(0.95·0.02/0.08) ≈ 0.49 for category;
    # overall fits the budget at λ = 1 and is measured there
    assert [c[2] for c in calls] == [False, True, False, True]
    assert calls[1][1] == pytest.approx(np.sqrt(0.95 * 0.02 / 0.08), abs=1e-3) and calls[3][1] == 1.0
    assert [p["directions"] for p in res.probes] == ["category", "overall"]
    assert all(t.ppl_increase <= 0.02 for t in res.trials)
    # at the strengths they can have, category (keeps 56%) still beats overall (keeps 70%)
    assert res.best is not None and res.best.directions == "category"
    # a rise the quadratic rule underestimates takes another step
    calls.clear()

    def steep(spec: AblationSpec, d: object, pairs: bool) -> tuple[np.ndarray | None, np.ndarray | None, float, float]:
        calls.append(("category", spec.strength, pairs))
        rise = (0.08 if spec.strength == 1 else 0.12) * spec.strength ** 2  # the probe looks cheaper
        m = less + (1 - 0.9 * spec.strength) * d0 if pairs else None
        return m, less if pairs else None, 10 * (1 + rise), 0.01

    res = run_ablate_loop(dirs, (less + d0, less), 10.0, cats, steep,
                          AblateConfig(max_ppl_increase=0.02, candidates=(("category", "stream"),)))
    lam1 = np.sqrt(0.95 * 0.02 / 0.08)
    lam2 = lam1 * np.sqrt(0.95 * 0.02 / (0.12 * lam1 ** 2))
    assert [c[1] for c in calls] == [1.0, pytest.approx(lam1, abs=1e-3), pytest.approx(lam2, abs=1e-3)]
    assert res.best is not None and res.best.spec.strength == pytest.approx(lam2, abs=1e-3)


def _suite(n: int = 90) -> Suite:
    items = [PairItem(str(i), i, ["x", "y", "z"][i % 3], f"m{i}", f"l{i}") for i in range(n)]
    return Suite("toy", "pairs", items, "toy")


def test_splits_share_base_write_each_split_and_keep_finished_ones(tmp_path: Path) -> None:
    from bias.shared import PairStates, Shared

    suite = _suite()
    rng = np.random.default_rng(6)
    base = (rng.standard_normal(90) + 0.4, np.zeros(90))
    st = PairStates(*(np.zeros((90, 2, 4)),) * 2, *(np.zeros((90, 4)),) * 2)

    class U:
        scorer = None

        def __call__(self) -> tuple[float, float]:
            return 10.0, 0.0

    sh = Shared(suite, base, st, [], U(), 10.0)  # type: ignore[arg-type]
    seen: list[tuple[str, tuple[int, ...]]] = []
    stop_at = [4]

    def fitter(method: str, cal: np.ndarray, work: Path, index: int) -> Correction:
        seen.append((method, tuple(cal)))
        if len(seen) == stop_at[0]:
            raise KeyboardInterrupt  # Ctrl-C in the second split

        def score(s: Suite) -> tuple[np.ndarray, np.ndarray]:
            rows = np.array([it.row for it in s.items])
            return base[0][rows] * 0.1, base[1][rows]

        fit = {"vector": targets[method]} if index == 0 and method in targets else {}
        return Correction(method, score, lambda s: None, lambda: (10.1, 0.01), lambda p, r: [], fit)

    targets: dict[str, str] = {}  # split 0's files (-o) the fitter says it wrote
    cfg = SplitsConfig(n_splits=3, exclude_category="z", probes_spec=None, n_boot=100)
    with pytest.raises(KeyboardInterrupt):
        run_splits(sh, fitter, cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert not saved["complete"] and len(saved["splits"]) == 2
    assert set(saved["splits"][0]["methods"]) == {"steer", "ablate"}
    assert saved["splits"][1]["methods"] == {"steer": saved["splits"][1]["methods"]["steer"]}
    # the two methods of a split calibrate on the same rows; splits differ; z is never calibrated on
    assert seen[0][1] == seen[1][1] and seen[0][1] != seen[2][1]
    assert all(suite.items[i].category != "z" for _, cal in seen for i in cal)
    s0 = saved["splits"][0]
    assert set(s0["calibration_rows"]).isdisjoint(s0["heldout_rows"])
    assert "kept_out" in s0["methods"]["steer"] and s0["methods"]["steer"]["heldout"]["diagnostics"]["slope"] == pytest.approx(-0.9)
    summ = saved["summary"]["steer"]
    assert summ["splits"] == 2 and summ["figures"]["pair_slope"]["median"] == pytest.approx(-0.9)
    assert summ["checks"]["ppl_within_budget"] == "2/2"
    again = summarize(saved["splits"], ("steer", "ablate"))
    assert again["ablate"]["splits"] == 1

    # the same run again keeps what finished and fits only the rest, unless fresh
    def fitted(c: SplitsConfig, **kw: object) -> list[tuple[str, tuple[int, ...]]]:
        seen.clear()
        run_splits(sh, fitter, c, tmp_path, **kw)  # type: ignore[arg-type]
        return seen[:]

    stop_at[0] = 0  # no more Ctrl-C
    cals = [tuple(cfg.rows(suite, s)[0]) for s in range(3)]
    assert fitted(cfg) == [("ablate", cals[1]), ("steer", cals[2]), ("ablate", cals[2])]
    done = json.loads((tmp_path / "results.json").read_text())
    assert done["complete"] and done["splits"][0] == saved["splits"][0]
    assert done["shared"]["kept_from_earlier_run"]["results"] == 3
    assert done["elapsed_s"] >= saved["elapsed_s"]
    assert fitted(cfg) == [] and len(fitted(cfg, fresh=True)) == 6
    # a run from before --ppl-tokens has no such key: it ran at the default, and is kept
    before = json.loads((tmp_path / "results.json").read_text())
    del before["config"]["ppl_tokens"]
    (tmp_path / "results.json").write_text(json.dumps(before))
    assert fitted(cfg) == []
    said: list[str] = []
    assert len(fitted(replace(cfg, ppl_tokens=512), on_event=lambda k, d: said.append(d.get("stage", "")))) == 6
    assert "holds a run with other settings (--ppl-tokens): starting over" in said[0]
    assert len(fitted(cfg)) == 6
    # other settings start over, and say so; a split-0 correction whose -o file is gone is fitted again
    out = replace(cfg, output=str(tmp_path / "fair.gguf"))
    targets.update({m: str(f) for m, f in out.outputs().items()})  # never written here: gone
    stages: list[str] = []
    assert len(fitted(out, on_event=lambda k, d: stages.append(d.get("stage", "")))) == 6
    assert f"{tmp_path / 'results.json'} holds a run with other settings (-o): starting over" in stages[0]
    assert fitted(out) == [("steer", cals[0]), ("ablate", cals[0])]
    for f in out.outputs().values():
        f.write_bytes(b"GGUF")
    assert fitted(out) == []


def test_a_split_run_says_roughly_how_long_it_has_left() -> None:
    """The "done" line's estimate: split 0 (which writes and scores the -o file) is timed apart
    from the plain splits, each method at its own median."""
    from bias.splits import time_left
    from edge.cli.bias import _left

    cfg = SplitsConfig(n_splits=5, methods=("steer", "ablate"))

    def rec(**sec: float) -> dict[str, Any]:
        return {"methods": {m: {"seconds": t} for m, t in sec.items()}}

    # split 0's time says little of the others': no estimate before a plain split finished
    assert time_left([rec(steer=800.0, ablate=100.0)], cfg) is None
    assert time_left([rec(steer=800.0, ablate=100.0), rec(steer=150.0)], cfg) is None  # nor ablate's
    splits = [rec(steer=800.0, ablate=100.0), rec(steer=150.0, ablate=40.0), rec(steer=170.0)]
    assert time_left(splits, cfg) == pytest.approx(40 + 2 * (160 + 40))
    # split 0 still to do, with no time of its own: at the plain splits' pace
    assert time_left([rec(), rec(steer=150.0, ablate=40.0)], cfg) == pytest.approx(4 * 190)
    assert time_left([rec(steer=9.0, ablate=1.0)] * 5, cfg) == 0.0
    assert (_left(0.0), _left(None), _left(75.0), _left(600.0)) == ("", "", "; about 75 s left", "; about 10 min left")


def test_shared_token_checks_see_a_shift_of_the_group_words_alone() -> None:
    """A correction that only makes the stereotyped side's group words less likely passes
    the whole-sentence pct checks and not the shared-token ones; parts add up."""
    from bias.audit import PairScores
    from bias.shared import PairStates, Shared
    from bias.splits import CHECKS, judge_correction

    suite = _suite(600)
    rng = np.random.default_rng(3)
    words, rest = rng.standard_normal(600) * 2, rng.standard_normal(600) + 0.3
    base = (words + rest, np.zeros(600))
    st = PairStates(*(np.zeros((600, 2, 4)),) * 2, *(np.zeros((600, 4)),) * 2)
    sh = Shared(suite, base, st, [], None, 10.0, base_words=words)  # type: ignore[arg-type]

    def score(s: Suite) -> PairScores:
        rows = np.array([it.row for it in s.items])
        # the words alone move, by less than would push the pct past 50 (an overshoot is worse)
        return PairScores(base[0][rows] - 0.4, base[1][rows], words[rows] - 0.4)

    corr = Correction("steer", score, lambda s: None, lambda: (10.1, 0.01), lambda p, r: [])
    held = np.arange(600)
    r = judge_correction(sh, corr, held, SplitsConfig(n_splits=1, probes_spec=None, n_boot=200))
    parts = r["heldout_parts"]
    assert parts["words"]["ALL"]["change"]["value"] == pytest.approx(-0.4)
    assert parts["rest"]["ALL"]["change"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert parts["rest_pct"]["ALL"]["before"]["value"] == pytest.approx(100 * np.mean(rest > 0))
    assert CHECKS["paired_change_significant"](r) and not CHECKS["shared_tokens_paired_change_significant"](r)
    assert CHECKS["shared_tokens_no_category_made_worse"](r)
    # every category's mean +0.3 → −0.1: nearer neutral by its point estimate
    assert r["categories"]["closer"] and CHECKS["biased_categories_closer"](r)
    assert r["heldout_scores"]["ll_words_diff"][:3] == pytest.approx((words[:3] - 0.4).tolist())


def test_category_checks_by_pct_see_flips_not_shrinks() -> None:
    """A shrink of every pair's difference by half moves each category's mean toward 0 and
    leaves its pct where it was (no pair changes sign); a common shift lowers both."""
    from bias.shared import PairStates, Shared
    from bias.splits import CHECKS, judge_correction

    suite = _suite(600)
    d = np.random.default_rng(5).standard_normal(600) + 0.8
    base = (d, np.zeros(600))
    st = PairStates(*(np.zeros((600, 2, 4)),) * 2, *(np.zeros((600, 4)),) * 2)
    sh = Shared(suite, base, st, [], None, 10.0)  # type: ignore[arg-type]
    held, cfg = np.arange(600), SplitsConfig(n_splits=1, probes_spec=None, n_boot=200)

    def judged(change: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
        def score(s: Suite) -> tuple[np.ndarray, np.ndarray]:
            rows = np.array([it.row for it in s.items])
            return change(d[rows]), np.zeros(len(rows))
        return judge_correction(sh, Correction("steer", score, lambda s: None, lambda: (10.1, 0.01),
                                               lambda p, r: []), held, cfg)

    shrunk = judged(lambda x: 0.5 * x)
    assert CHECKS["biased_categories_moved"](shrunk) and CHECKS["biased_categories_closer"](shrunk)
    assert not CHECKS["biased_categories_moved_pct"](shrunk) and not CHECKS["biased_categories_closer_pct"](shrunk)
    assert CHECKS["no_biased_category_made_worse_pct"](shrunk)
    shifted = judged(lambda x: x - 0.5)
    assert CHECKS["biased_categories_moved_pct"](shifted) and CHECKS["biased_categories_closer_pct"](shifted)
    pushed = judged(lambda x: x + 0.5)
    assert not CHECKS["no_biased_category_made_worse_pct"](pushed)


def test_a_requantized_files_change_is_set_beside_the_engines() -> None:
    """The deployed file's quantized arithmetic moves pairs apart from the edit (Q4_1 against
    its own dequantized weights: up to 11 nats on a pair); scoring its uncorrected source
    the same way leaves the edit's change, which must match the engine's."""
    from dataclasses import replace

    from bias.audit import PairScores
    from bias.shared import PairStates, Shared
    from bias.splits import judge_correction
    from bias.splits_report import _deployed

    suite = _suite(600)
    rng = np.random.default_rng(4)
    base = (rng.standard_normal(600) + 0.4, np.zeros(600))
    quant = rng.standard_normal(600) * 0.7  # what the file's arithmetic adds to each pair
    st = PairStates(*(np.zeros((600, 2, 4)),) * 2, *(np.zeros((600, 4)),) * 2)
    sh = Shared(suite, base, st, [], None, 10.0)  # type: ignore[arg-type]

    def scored(shift: float, q: float):  # noqa: ANN202
        def f(s: Suite) -> PairScores:
            rows = np.array([it.row for it in s.items])
            return PairScores(base[0][rows] - shift + q * quant[rows], base[1][rows], np.zeros(len(rows)))
        return f

    corr = Correction("learn", scored(0.3, 0), lambda s: None, lambda: (10.1, 0.01), lambda p, r: [])
    corr = replace(corr, score_deployed=scored(0.3, 1), score_source=scored(0, 1),
                   score_device=lambda s: ([scored(0, 0.9)(s), scored(0, 1.1)(s)],
                                           [scored(0.3, 0.9)(s), scored(0.3, 1.1)(s)]))
    r = judge_correction(sh, corr, np.arange(600), SplitsConfig(n_splits=1, probes_spec=None, n_boot=200))
    dep = r["deployed"]
    assert abs(dep["difference"]) > 0.5  # the file alone, against the engine, looks off
    file_change = dep["pct_stereotype"] - dep["source_pct_stereotype"]
    eng_change = dep["engine_pct_stereotype"] - dep["engine_before_pct_stereotype"]
    assert dep["change_difference"] == pytest.approx(file_change - eng_change)
    assert dep["engine_before_pct_stereotype"] == pytest.approx(100 * np.mean(base[0] > 0))
    line = "\n".join(_deployed({"splits": [{"seed": 0, "methods": {"learn": r}}]}))
    assert f"the file's own change, {file_change:+.2f} points" in line and f"{dep['change_difference']:+.2f}" in line
    # llama.cpp's arithmetic in the engine: its noise's size, and the file set beside what it should read
    dev = dep["device"]
    assert dev["after"]["chaotic_sd"] == pytest.approx(0.2 * quant.std() / np.sqrt(2))
    assert dev["after"]["expected_pct"] == pytest.approx(np.mean(dev["after"]["pcts"]))
    assert dep["device_difference"] == pytest.approx(dep["pct_stereotype"] - dev["after"]["expected_pct"])
    assert abs(dep["device_difference"]) < abs(dep["difference"])
    assert f"this file is {dep['device_difference']:+.2f} points from its expected reading" in line


def test_a_correction_that_found_nothing_is_judged_by_the_shared_scores() -> None:
    """Rescoring the uncorrected model moves scores by the batch layout's jitter, which a
    paired bootstrap over many pairs calls significant; the identity must change nothing."""
    from bias.shared import PairStates, Shared
    from bias.splits import judge_correction

    suite = _suite(600)
    rng = np.random.default_rng(2)
    base = (rng.standard_normal(600) + 0.4, rng.standard_normal(600))
    st = PairStates(*(np.zeros((600, 2, 4)),) * 2, *(np.zeros((600, 4)),) * 2)
    sh = Shared(suite, base, st, [], None, 10.0)  # type: ignore[arg-type]
    held = np.arange(100, 600)
    cfg = SplitsConfig(n_splits=1, probes_spec=None, n_boot=200)
    out = judge_correction(sh, Correction.identity("ablate", {"loop": {}}), held, cfg)
    assert out["heldout"]["pct_stereotype"]["change"]["value"] == 0
    assert out["categories"]["made_worse"] == [] and out["ppl"]["increase"] == 0
    # what a rescore with 0.01-nat jitter looks like: the same bootstrap flags it
    jitter = (base[0][held] + 0.01 + rng.standard_normal(500) * 0.002, base[1][held])
    pj = judge_pair_rows((base[0][held], base[1][held]), jitter, np.zeros(500), n_boot=200)
    assert pj.mean_ll_diff.away_from_neutral


def test_split_caps_keep_every_kept_out_row_and_stay_disjoint() -> None:
    suite = _suite(300)
    cfg = SplitsConfig(n_splits=2, exclude_category="z", calib_limit=20, heldout_limit=50)
    cal, held = cfg.rows(suite, 0)
    cats = np.array([it.category for it in suite.items])
    assert len(cal) == 20 and not set(cal) & set(held)
    assert (cats[held] == "z").sum() == 100 and (cats[held] != "z").sum() == 50  # all of z, 50 others
    assert "z" not in set(cats[cal])
    again = cfg.rows(suite, 0)
    assert np.array_equal(again[0], cal) and np.array_equal(again[1], held)  # seeded
    assert not np.array_equal(cfg.rows(suite, 1)[0], cal)


def test_shared_cache_round_trips_and_refuses_another_key(tmp_path: Path) -> None:
    from bias.shared import PairStates, Shared, _load_cache, _save_cache

    rng = np.random.default_rng(0)
    st = PairStates(*(rng.standard_normal((6, 2, 4)).astype(np.float32),) * 2,
                    *(rng.standard_normal((6, 4)).astype(np.float32),) * 2)
    base = (rng.standard_normal(6), np.full(6, np.nan))
    sh = Shared(_suite(6), base, st, [], None, 10.0, bbq_base=np.ones((3, 3)),  # type: ignore[arg-type]
                gen_base=[{"row": 1, "answers": []}])
    key, bbq_key = {"model": "m", "rows": [0, 1]}, {"bbq": "bbq", "bbq_per_condition": 3}
    _save_cache(tmp_path, key, bbq_key, sh)
    got = _load_cache(tmp_path, key)
    assert got is not None and got["gen_base"] == sh.gen_base
    assert got["bbq_key"] == bbq_key  # compute_shared rescores BBQ alone when this differs
    np.testing.assert_array_equal(got["base"][0], base[0])
    assert np.isnan(got["base"][1]).all()
    np.testing.assert_array_equal(got["states"].h_more, st.h_more)
    np.testing.assert_array_equal(got["bbq_base"], np.ones((3, 3)))
    assert got["states"].o_more is None and got["states"].head[0] is got["states"].e_more  # tied: e
    # an untied head's rows are kept and taken with the rows
    o = rng.standard_normal((6, 4)).astype(np.float32)
    sh.states = PairStates(st.h_more, st.h_less, st.e_more, st.e_less, o, -o)
    _save_cache(tmp_path, key, bbq_key, sh)
    got = _load_cache(tmp_path, key)
    assert got is not None
    np.testing.assert_array_equal(got["states"].take([4, 1]).head[1], -o[[4, 1]])
    assert _load_cache(tmp_path, {**key, "model": "other"}) is None
    (tmp_path / "shared.npz").write_bytes(b"partial")
    assert _load_cache(tmp_path, key) is None  # a damaged cache is recomputed, not trusted


def test_a_run_that_reads_no_pair_states_uses_any_cache_and_its_own_serves_no_other(tmp_path: Path) -> None:
    from bias.shared import PairStates, Shared, _load_cache, _save_cache

    rng = np.random.default_rng(0)
    st = PairStates(*(rng.standard_normal((6, 2, 4)).astype(np.float32),) * 2,
                    *(rng.standard_normal((6, 4)).astype(np.float32),) * 2)
    sh = Shared(_suite(6), (np.zeros(6), np.ones(6)), st, [], None, 10.0)  # type: ignore[arg-type]
    with_states = {"model": "m", "states_model": "f16", "state_rows": [0, 2]}
    learn_only = {**with_states, "state_rows": []}
    ignore = ("states_model", "state_rows")  # as compute_shared passes for an empty state_rows
    _save_cache(tmp_path, with_states, {}, sh)
    assert _load_cache(tmp_path, learn_only) is None  # by the full key, another run's
    got = _load_cache(tmp_path, learn_only, ignore)
    assert got is not None and got["states"] is None  # its states are not loaded for a run without use
    assert _load_cache(tmp_path, {**learn_only, "model": "other"}, ignore) is None  # the rest still counts
    sh.states = None
    _save_cache(tmp_path, learn_only, {}, sh)
    assert _load_cache(tmp_path, learn_only, ignore) is not None
    assert _load_cache(tmp_path, learn_only) is None  # a run that needs states recomputes them
    with pytest.raises(RuntimeError, match="no pair states"):
        sh.states_of(np.array([0]))


def test_shared_position_states_are_reused_only_for_the_same_model_and_rows(tmp_path: Path) -> None:
    """A rerun finds the states at the shared tokens in the run folder; another model or
    other rows read them again (here: no runtime to read with, so the read fails)."""
    from bias.shared import read_shared_positions

    suite = _suite(6)
    key = json.dumps({"model": "m.gguf", "suite": suite.source, "rows": [suite.items[i].row for i in (1, 4)]})
    h = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    np.savez(tmp_path / "shared_positions.npz", h_more=h, h_less=-h, ok=np.ones(6, bool), key=np.array(key))
    reads: list[int] = []
    hm, hl, ok = read_shared_positions(None, suite, "m.gguf", threads=1, rows=np.array([4, 1, 4]),  # type: ignore[arg-type]
                                       cache_dir=tmp_path, on_read=lambda: reads.append(1))
    assert not reads and ok.all()
    np.testing.assert_array_equal(hl, -h)
    for model, rows in (("other.gguf", [1, 4]), ("m.gguf", [1, 2])):
        with pytest.raises(AttributeError):
            read_shared_positions(None, suite, model, threads=1, rows=np.array(rows),  # type: ignore[arg-type]
                                  cache_dir=tmp_path, on_read=lambda: reads.append(1))
    assert len(reads) == 2


def test_report_lists_categories_and_flags_one_pushed_into_bias() -> None:
    """The overall pct can reach 50 by pushing a big anti-stereotypical category further:
    the per-category table shows it (biased by pct after, not before)."""
    from bias.splits_report import _category_lines, made_biased

    def fig(b: float, a: float, half: float, neutral: float) -> dict[str, Any]:
        e = {"before": {"value": b, "lo": b - half, "hi": b + half, "n": 300},
             "after": {"value": a, "lo": a - half, "hi": a + half, "n": 300}}
        e["excluded_before"] = not e["before"]["lo"] <= neutral <= e["before"]["hi"]
        e["contains_after"] = e["after"]["lo"] <= neutral <= e["after"]["hi"]
        e["change"] = {"value": a - b, "lo": a - b - half / 2, "hi": a - b + half / 2}
        return e

    def run(race_after: float) -> dict[str, Any]:
        return {"heldout": {"per_category": {
                    "race": {"pct_stereotype": fig(48.0, race_after, 4.0, 50.0),
                             "mean_ll_diff": fig(-1.0, -1.6, 0.5, 0.0)},
                    "age": {"pct_stereotype": fig(64.0, 60.0, 6.0, 50.0), "mean_ll_diff": fig(1.4, 1.2, 1.0, 0.0)}}},
                "categories": {"biased_before": ["race", "age"], "moved_toward_neutral": [], "made_worse": ["race"]}}

    res = {"config": {"methods": ["gate"]},
           "splits": [{"methods": {"gate": run(37.0)}}, {"methods": {"gate": run(47.0)}}]}
    lines = _category_lines(res)
    assert "## Categories, gate (held-out; median over 2 splits)" in lines
    race = next(x for x in lines if x.startswith("| race |"))
    # median pct after 42.0; worse on both splits; made biased by pct on one (37 ± 4 leaves 50)
    assert race == "| race | 300 | 48.0 → 42.0 | -1.00 → -1.60 | ±0.25 | 2 | 0 | 2 | 1 |"
    # age's −0.2 is inside its ±0.50: not moved, and the table shows why
    assert next(x for x in lines if x.startswith("| age |")).endswith("| +1.40 → +1.20 | ±0.50 | 2 | 0 | 0 | 0 |")
    assert made_biased(res, "gate") == {"race": 1}


def test_report_draws_each_split_s_categories_and_reads_as_a_page(tmp_path: Path) -> None:
    """categories-<method>.png colours a category by what its change's CI says (green: toward
    0, red: away, blue: neither), and report.html carries report.md's tables and the plot."""
    import matplotlib.image as mpimg

    from bias.splits_report import MOVE_COLORS, category_plot, report_html, report_md

    def fig(b: float, a: float, toward: bool, away: bool) -> dict[str, Any]:
        return {"before": {"value": b, "lo": b - 1, "hi": b + 1, "n": 60},
                "after": {"value": a, "lo": a - 1, "hi": a + 1, "n": 60},
                "change": {"value": a - b, "lo": a - b - 0.2, "hi": a - b + 0.2, "n": 60},
                "toward_neutral": toward, "away_from_neutral": away, "excluded_before": True, "contains_after": False}

    def split(seed: int, race: tuple[float, bool, bool]) -> dict[str, Any]:
        per = {"race": {"mean_ll_diff": fig(-1.5, race[0], race[1], race[2]),
                        "pct_stereotype": fig(45.0, 47.0, True, False)},
               "age": {"mean_ll_diff": fig(1.4, 1.3, False, False), "pct_stereotype": fig(60.0, 59.0, False, False)}}
        return {"seed": seed, "methods": {"learn": {"heldout": {"per_category": per},
                "categories": {"biased_before": ["race"], "moved_toward_neutral": [], "made_worse": []}}}}

    def colours(res: dict[str, Any]) -> set[str]:
        png = category_plot(res, "learn", tmp_path / "c.png")
        assert png is not None
        img = mpimg.imread(png)
        top = img[: int(0.8 * len(img))]  # the plot area: the legend, which draws every colour, is below
        px = {tuple(int(round(255 * v)) for v in p[:3]) for p in top.reshape(-1, 4)}
        return {k for k, c in MOVE_COLORS.items() if tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) in px}

    cfg = {"methods": ["learn"], "exclude_category": None, "n_splits": 2, "calib_frac": 0.3, "max_ppl_increase": 0.02}
    moved = {"config": cfg, "splits": [split(0, (-0.5, True, False)), split(1, (-2.5, False, True))]}
    still = {"config": cfg, "splits": [split(0, (-1.4, False, False))]}
    assert colours(moved) == {"moved", "worse", "other"} and colours(still) == {"other"}
    assert category_plot({"config": cfg, "splits": []}, "learn", tmp_path / "none.png") is None
    md = ("# Bias mitigation\n\nsome **bold** and `x<y`\n\n| a | b |\n|---|---|\n| race | -1.0 → -0.5 |\n"
          "| age | +1.4 |\n| fall | 0 of \\|pct−50\\| |\n\n![categories-learn](categories-learn.png)\n")
    page = report_html(md, "t <x>")
    assert "<title>t &lt;x&gt;</title>" in page and "<h1>Bias mitigation</h1>" in page
    assert "<p>some <b>bold</b> and <code>x&lt;y</code></p>" in page
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>race</td><td>-1.0 → -0.5</td></tr><tr><td>age</td>" in page
    assert '<img src="categories-learn.png" alt="categories-learn">' in page and "---" not in page
    assert "<tr><td>fall</td><td>0 of |pct−50|</td></tr></table>" in page  # an escaped pipe stays in its cell
    assert "![categories-learn](categories-learn.png)" in report_md({"config": cfg, "splits": []}, ["categories-learn.png"])


def test_the_summary_reads_as_two_tables_one_column_a_method_with_the_misses_in_bold() -> None:
    from bias.splits import CHECKS, FIGURES
    from bias.splits_report import CHECK_LABELS, FIGURE_DECIMALS, FIGURE_LABELS, _summary_tables

    assert set(FIGURE_LABELS) == set(FIGURES) == set(FIGURE_DECIMALS) and set(CHECK_LABELS) == set(CHECKS)
    fig = {"median": 51.3, "min": 50.6, "max": 52.0, "n": 5}
    res = {"summary": {
        "learn": {"splits": 5, "figures": {"heldout_pct_after": fig,
                                           "gen_stereo_rate_after": {"median": 0.482, "min": 0.482, "max": 0.482, "n": 1},
                                           "pair_slope": {"median": -0.0047, "min": -0.00975, "max": -9.15e-05, "n": 5}},
                  "checks": {"paired_change_significant": "5/5", "biased_categories_moved": "0/5"}},
        "steer": {"splits": 3, "figures": {"heldout_pct_after": {**fig, "n": 2}},
                  "checks": {"paired_change_significant": "2/3"}},
        "ablate": {"splits": 0, "figures": {}, "checks": {}}}}  # interrupted before its first split
    lines = _summary_tables(res)
    assert "| | learn (5 splits) | steer (3 splits) |" in lines
    # one scale a figure (its unit's decimals), not ":.3g"'s "52" beside "50.6" or "-9.15e-05"
    assert "| held-out pct, after | 51.3 [50.6, 52.0] | 51.3 [50.6, 52.0] (2 of 3) |" in lines
    assert "| per pair: slope of the change on the difference before | -0.005 [-0.010, 0.000] | – |" in lines
    assert "| generation: stereotype rate, after | 0.482 (1 split of 5) | – |" in lines
    assert "| the paired change is significant, toward 50 | 5/5 | **2/3** |" in lines
    assert "| every category biased before moved toward neutral (its change's CI) | **0/5** | – |" in lines
    assert _summary_tables({"summary": {"ablate": res["summary"]["ablate"]}}) == []


def test_bbq_resolution_is_read_from_a_split_the_correction_changed() -> None:
    """An uncorrected split's BBQ change is exactly 0 with a zero-width CI: the report's
    resolution line must come from a split where the loop kept a correction."""
    from bias.splits_report import _bbq_resolution

    def run(after: float, lo: float, hi: float) -> dict[str, Any]:
        return {"ppl": {"before": 15.5, "after": after}, "bbq": {"acc_dis": {"change": {"lo": lo, "hi": hi}}}}

    res = {"splits": [{"seed": 0, "methods": {"ablate": run(15.5, 0.0, 0.0)}},
                      {"seed": 1, "methods": {"ablate": run(15.8, -0.019, 0.027)}}]}
    assert "known to ±2.3 points (half its 95% CI, seed 1)" in _bbq_resolution(res)[1]
    assert "seed 0" in _bbq_resolution({"splits": res["splits"][:1]})[1]  # nothing corrected: what there is
    assert _bbq_resolution({"splits": [{"seed": 0, "methods": {"ablate": {"ppl": {}}}}]}) == []


def test_a_fold_that_kept_no_edit_says_so_and_gives_no_requantization_cost() -> None:
    from bias.splits_report import _fold_line

    fold = {"path": "fair.gguf", "weight_type": "source", "edited": [], "worst": None,
            "requant_kl": {"kl_mean": 0.0027, "kl_p99": 0.01, "ppl_full": 11.2, "ppl_quantized": 11.3,
                           "top1_agreement": 0.97}}
    assert _fold_line(0, "ablated", fold) == "Split 0 ablated GGUF: fair.gguf (no tensor edited: the source model's weights)."
    fold["edited"] = ["output.weight"]
    assert "1 tensor edited: output.weight; re-quantization cost against the fold the run scored (the edit at F16): KL 0.0027" in _fold_line(0, "ablated", fold)
