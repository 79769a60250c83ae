"""The learned edit (bias.learn, `edge bias mitigate --method learn`): how the rounds spend
the PPL budget, the errors a user meets without torch or memory, and one run on the bundled
model whose torch forward and folded GGUF are checked against llama.cpp."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bias.learn import (
    LearnConfig,
    LearnRound,
    batch_coefficients,
    category_objective,
    choose,
    next_beta,
    rate,
)
from edge.cli import cli
from edge.errors import InsufficientMemoryError
from tests.conftest import SHARED_DATA


def _round(r: int, beta: float, rise: float, val: float = 0.5) -> LearnRound:
    return LearnRound(r, beta, 10, 10, val, val, rise, 0.0, 1.0)


def test_a_negative_number_of_swapped_pairs_is_refused() -> None:
    from edge.errors import BadOptionError

    with pytest.raises(BadOptionError, match="swaps"):
        LearnConfig(swaps=-1).validate()


@pytest.mark.parametrize("balanced", [False, True])
def test_the_category_objective_and_its_per_pair_gradient_agree(balanced: bool) -> None:
    rng = np.random.default_rng(0)
    groups = np.array(["a"] * 6 + ["b"] * 3 + ["c"])
    d = rng.normal(size=10)
    v, k = category_objective(d, groups, balanced)
    m = {g: d[groups == g].mean() for g in "abc"}
    w = {g: (1 / 3 if balanced else (groups == g).mean()) for g in "abc"}
    assert v == pytest.approx(sum(w[g] * m[g] ** 2 for g in "abc"))
    # k_i / n is ∂v/∂d_i: a finite difference on each pair
    for i in range(10):
        e = np.zeros(10)
        e[i] = 1e-6
        assert (category_objective(d + e, groups, balanced)[0] - v) / 1e-6 == pytest.approx(k[i] / 10, rel=1e-4)
    # a category whose mean is 0 gets no push, whatever its pairs' spread
    d2 = np.array([1.0, -1.0, 3.0, -3.0, 0.5, -0.5, 2.0, 2.0, 2.0, 0.0])
    assert np.all(category_objective(d2, groups, balanced)[1][:6] == 0)


@pytest.mark.parametrize("balanced", [False, True])
def test_a_batch_with_a_few_pairs_of_each_category_estimates_the_gradient_without_bias(balanced: bool) -> None:
    # d linear in θ (d = A θ): ∇objective = Σ_i (k_i / n) A_i, and the batch's Σ k_j A_j,
    # averaged over every way of drawing b pairs within each category, must equal it
    rng = np.random.default_rng(1)
    groups = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    d, A = rng.normal(size=10), rng.normal(size=(10, 4))
    want = category_objective(d, groups, balanced)[1] @ A / 10
    from itertools import combinations, product

    members = [np.flatnonzero(groups == g) for g in "abc"]
    for b in (1, 2):
        draws = [np.concatenate(c) for c in product(*(list(map(list, combinations(m, b))) for m in members))]
        got = np.mean([batch_coefficients(d, groups, j, balanced) @ A[j] for j in draws], axis=0)
        assert got == pytest.approx(want, rel=1e-9)


def test_an_unknown_objective_or_one_without_categories_is_refused() -> None:
    from bias.learn import learn_edit
    from edge.errors import BadOptionError

    with pytest.raises(BadOptionError, match="objective must be one of pairs, pairs-balanced, means, balanced"):
        LearnConfig(objective="mean").validate()
    with pytest.raises(BadOptionError, match="part must be one of sentence, rest"):
        LearnConfig(part="words").validate()
    with pytest.raises(BadOptionError, match="needs each pair's category"):
        learn_edit(Path("unused.gguf"), [[1, 2]], [[1, 3]], [], lambda p, n: (0.0, 0.0), 0.02,
                   LearnConfig(objective="means"))


def test_the_cosine_rate_warms_up_then_settles_to_zero_and_unknown_settings_are_refused() -> None:
    from edge.errors import BadOptionError

    r = np.array([rate(k, 200, "cosine") for k in range(200)])
    assert r[0] == pytest.approx(0.05) and r[19] == 1.0  # a linear warm-up over the first tenth
    assert np.all(np.diff(r[:20]) > 0) and np.all(np.diff(r[19:]) < 0)
    assert r[-1] < 1e-3  # the last step, which pick="last" keeps, barely moves the edit
    assert all(rate(k, 200, "constant") == 1.0 for k in (0, 100, 199))
    assert rate(0, 1, "cosine") > 0  # a one-step round still steps
    for bad in ({"schedule": "linear"}, {"pick": "best"}):
        with pytest.raises(BadOptionError, match=f"{next(iter(bad))} must be one of"):
            LearnConfig(**bad).validate()


def test_the_edited_layers_come_from_the_top_and_never_include_the_embedding() -> None:
    from edge.errors import BadOptionError

    assert LearnConfig().start(30) == 29 and LearnConfig().start(32) == 31  # the last alone (Llama-2-7B: 32)
    assert LearnConfig(layers=None).start(30) == 15 and LearnConfig(layers=None).start(32) == 16  # the upper half
    assert LearnConfig(layers=15).start(30) == 15 and LearnConfig.for_objective("balanced").layers == 1
    assert LearnConfig(layers=99).start(30) == 1  # all but the embedding's layer 0
    assert LearnConfig(first_layer=3, layers=1).start(30) == 3  # an explicit first layer wins
    with pytest.raises(BadOptionError, match="past the model's 30 layers"):
        LearnConfig(first_layer=30).start(30)
    with pytest.raises(BadOptionError, match="layers must be"):
        LearnConfig(layers=0).validate()


def test_the_cli_passes_the_objective_and_layers_with_the_settings_measured_for_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bias.methods

    seen: list[LearnConfig] = []

    def stop(*a: object, learn: LearnConfig, **kw: object) -> None:
        seen.append(learn)
        raise SystemExit(0)  # only the plumbing is under test: nothing is fitted

    monkeypatch.setattr(bias.methods, "mitigate_splits", stop)
    base = ["bias", "mitigate", "--suite", "probes", "-o", str(tmp_path / "f.gguf"), "--method", "learn"]
    for extra in ([], ["--learn-objective", "balanced", "--learn-layers", "3"]):
        assert CliRunner().invoke(cli, base + extra).exit_code == 0
    plain, bal = seen
    assert (plain.objective, plain.layers, plain.schedule, plain.pick, plain.rounds) == ("pairs", 1, "constant",
                                                                                        "val", 5)
    assert (bal.objective, bal.layers, bal.schedule, bal.pick, bal.rounds) == ("balanced", 3, "cosine", "last", 1)
    r = CliRunner().invoke(cli, base + ["--learn-layers", "0"])
    assert r.exit_code == 2 and "--learn-layers" in r.output


def test_bbq_is_judged_in_torch_with_more_items_only_when_learn_edits_the_last_layer_alone() -> None:
    from bias.methods import bbq_engine
    from bias.splits import BBQ_ITEMS

    assert bbq_engine(("learn",), LearnConfig(), 30) == "torch"
    assert bbq_engine(("learn",), LearnConfig(layers=2), 30) == "llama.cpp"  # deeper edits fold a split
    assert bbq_engine(("learn",), LearnConfig(first_layer=29, layers=None), 30) == "torch"
    assert bbq_engine(("steer", "learn"), LearnConfig(), 30) == "llama.cpp"  # steer needs llama.cpp's BBQ
    assert BBQ_ITEMS["torch"] > BBQ_ITEMS["llama.cpp"]


def test_rounds_lower_beta_while_the_budget_has_room_and_keep_the_best_within_it() -> None:
    cfg = LearnConfig(rounds=4, beta_factor=0.5, fill=0.5)
    # far under budget: lower β; near it: stop
    assert next_beta([_round(0, 1.0, 0.002)], 0.02, cfg) == 0.5
    assert next_beta([_round(0, 1.0, 0.002), _round(1, 0.5, 0.015)], 0.02, cfg) is None
    # over budget with nothing within: raise β; over budget after a round within: stop
    assert next_beta([_round(0, 1.0, 0.03)], 0.02, cfg) == 2.0
    assert next_beta([_round(0, 1.0, 0.002), _round(1, 0.5, 0.03)], 0.02, cfg) is None
    # the round cap
    rs = [_round(i, 1.0, 0.001) for i in range(4)]
    assert next_beta(rs, 0.02, cfg) is None
    # a lower β that gained (almost) nothing on the validation pairs ends the loop
    assert next_beta([_round(0, 1.0, 0.002, 0.75), _round(1, 0.5, 0.003, 0.74)], 0.02, cfg) is None
    assert next_beta([_round(0, 1.0, 0.002, 0.75), _round(1, 0.5, 0.003, 0.70)], 0.02, cfg) == 0.25
    # the smallest validation pairs within budget win; a better one over budget does not
    rs = [_round(0, 1.0, 0.005, 0.8), _round(1, 0.5, 0.015, 0.6), _round(2, 0.25, 0.025, 0.4)]
    assert choose(rs, 0.02) == 1
    assert choose([_round(0, 1.0, 0.03)], 0.02) is None


def test_without_torch_learn_is_a_one_line_error_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    r = CliRunner().invoke(cli, ["bias", "mitigate", "--suite", "probes", "-o", str(tmp_path / "f.gguf"),
                                  "--method", "learn"])
    assert r.exit_code == 2
    assert "pip install 'edge[learn]'" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "f-report").exists() and not (tmp_path / "f.gguf").exists()


def test_a_model_too_large_for_memory_is_refused_with_what_it_needs(tmp_path: Path) -> None:
    from bias.learn import check_memory
    from edge.catalog import resolve_model

    path = resolve_model(None)
    with pytest.raises(InsufficientMemoryError, match="GiB.*larger machine"):
        check_memory(path, available=100 << 20)
    assert check_memory(path, available=64 << 30) > 4 * 100e6  # 4 bytes a parameter, and more
    # a split run's kept last-layer inputs: 2 × n_embd (576) float32 a position, and the stream of a pass
    assert check_memory(path, available=64 << 30, rows=1000) - check_memory(path, available=64 << 30) == 12 * 576 * 1000
    # the neutral text's reference log-probs: the vocabulary (49,152) in float32 a position
    assert check_memory(path, available=64 << 30, vocab_rows=10) - check_memory(path, available=64 << 30) == 4 * 49152 * 10


@pytest.mark.slow
def test_learn_on_the_bundled_model_folds_what_torch_trained(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import llama_cpp

    from bias.learn import TorchLlama
    from bias.methods import mitigate_splits
    from bias.splits import SplitsConfig

    out = tmp_path / "fair.gguf"
    bbq = SHARED_DATA / "bbq"
    cfg = SplitsConfig(n_splits=1, methods=("learn",), repeat=0, probes_spec=None, calib_limit=40,
                       heldout_limit=40, output=str(out), max_ppl_increase=0.05, weights="F16",
                       bbq_spec=f"bbq:{bbq}" if bbq.exists() else None, bbq_per_condition=4, ppl_tokens=512)
    learn = LearnConfig(steps=6, more_steps=4, rounds=2, eval_every=3, pairs=8, neutral_windows=16, lr=1e-2)
    stages: list[str] = []

    def stop_at_first_step(kind: str, data: dict[str, Any]) -> None:
        stages.append(data.get("stage", ""))
        if kind == "learn_step":
            raise KeyboardInterrupt

    # every lower layer dequantized, with the stage it was read in: a last-layer run reads
    # the layers below the edit in its first stages only, a pass each (rows, then BBQ's
    # answers), never in a fit (its neutral windows and agreement check come from the rows)
    reads: list[tuple[str, int]] = []
    read = TorchLlama._read

    def counted(self: TorchLlama, il: int) -> Any:
        if il < self.keep_from:
            reads.append((next((st for st in reversed(stages) if st), ""), il))
        return read(self, il)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchLlama, "_read", counted)
        with pytest.raises(KeyboardInterrupt):
            mitigate_splits(None, "probes", tmp_path / "rep", cfg=cfg, learn=learn, threads=2,
                            on_event=stop_at_first_step)
    first = ["learn: every pair's last-layer inputs"] + (["learn: BBQ answers' last-layer inputs"] if cfg.bbq_spec else [])
    n_lower = max(il for _, il in reads) + 1
    assert reads == [(st, il) for st in first for il in range(n_lower)] and n_lower > 20
    # the pairs' last-layer inputs stay in the run's folder for the rerun, which reads them
    # instead of running the lower layers again, and deletes them once every split is done
    rows_file = tmp_path / "rep" / "learn_rows.pt"
    assert "learn: every pair's last-layer inputs" in stages and rows_file.exists()
    stages.clear()
    res = mitigate_splits(None, "probes", tmp_path / "rep", cfg=cfg, learn=learn, threads=2,
                          on_event=lambda kind, data: stages.append(data.get("stage", "")))
    assert "learn: last-layer inputs kept from an earlier run (learn_rows.pt)" in stages
    assert "learn: every pair's last-layer inputs" not in stages and not rows_file.exists()
    r = res.to_dict()["splits"][0]["methods"]["learn"]
    fit = r["fit"]
    # the torch forward scores the pairs as llama.cpp does (F16 weights either side)
    assert fit["agreement"] < 0.05
    assert fit["train_pairs"] + fit["val_pairs"] == 40 and fit["val_pairs"] == 8
    assert fit["swapped_pairs"] == 0  # bias.swap's pairs only when LearnConfig.swaps asks
    assert 1 <= len(fit["rounds"]) <= 2 and fit["chosen"] is not None
    chosen = fit["rounds"][fit["chosen"]]
    assert chosen["ppl_increase"] <= 0.05 and r["ppl"]["increase"] == pytest.approx(chosen["ppl_increase"], abs=1e-9)
    assert chosen["best_step"] > 0 and chosen["train_d2"] < 1.0  # it shrank the pairs it trained on
    done = 0
    for k, rd in enumerate(fit["rounds"]):  # best_step names the kept parameters' step, of whichever round
        done += rd["steps"]
        assert rd["best_step"] <= done
        if k and rd["val_d2"] == fit["rounds"][k - 1]["val_d2"]:  # nothing better: the earlier round's step
            assert rd["best_step"] == fit["rounds"][k - 1]["best_step"]
        elif k:
            assert rd["best_step"] > done - rd["steps"]
    # judged in torch on shared rows; the deployed file, in plain llama.cpp, scores the
    # held-out pairs as the torch edit does
    after = np.subtract(r["heldout_scores"]["ll_more"], r["heldout_scores"]["ll_less"])
    assert r["engine"] == "torch" and len(r["deployed"]["ll_diff"]) == len(after) == 40
    assert np.abs(np.asarray(r["deployed"]["ll_diff"]) - after).max() < 0.1
    if bbq.exists():  # BBQ judged on the answers' torch rows alone: llama.cpp scored none of it
        assert 0 <= r["bbq"]["acc_dis"]["before"]["value"] <= 1 and "s_amb" in r["bbq"] and r["bbq_engine"] == "torch"
        assert "PPL and BBQ, before and after, are scored in torch" in (tmp_path / "rep" / "report.md").read_text()
        with np.load(tmp_path / "rep" / "shared.npz") as z:
            assert "bbq_base" not in z.files
    # the page beside report.md, with the categories' plot
    rep = tmp_path / "rep"
    assert '<img src="categories-learn.png"' in (rep / "report.html").read_text()
    assert (rep / "categories-learn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved edit is what the GGUF holds: torch with it applied and plain llama.cpp on
    # the file give the same pair difference
    ed = np.load(tmp_path / "rep" / "split0" / "learn_edit.npz")  # bias.learn.save_edit
    assert list(ed["layers"]) == [29] and ed["u"].shape == (1, 576, 4)  # the last layer alone, by default
    U, V, b = (torch.from_numpy(ed[k]) for k in ("u", "v", "b"))

    def edit(il: int, x: torch.Tensor, down: bool) -> torch.Tensor:
        if il < 29:
            return x
        j = il - 29
        x = x - (x @ V[j]) @ U[j].T
        return x + b[j] if down else x

    src = Path(json.loads((tmp_path / "rep" / "results.json").read_text())["shared"]["model"])
    m = TorchLlama(src)
    text = b"The old man could not use the phone because he was"
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    toks = [llm.token_bos(), *llm.tokenize(text, add_bos=False)]
    llm.eval(toks)
    lp = np.asarray(llm.scores[: len(toks) - 1], np.float64)
    llm.close()
    lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    ll_cpp = float(sum(lp[i, toks[i + 1]] for i in range(len(toks) - 1)))
    with torch.no_grad():
        ll_torch = float(m.seq_ll([toks], edit)[0][0])
        ll_plain = float(m.seq_ll([toks])[0][0])
    assert abs(ll_cpp - ll_torch) < 0.05 and abs(ll_torch - ll_plain) > 0.01


def test_the_report_says_which_objective_and_layers_learn_fitted() -> None:
    """Two learn runs differ by their settings alone: the report must carry them."""
    from dataclasses import asdict

    from bias.splits_report import _learn_settings

    res = {"config": {"methods": ["learn"]}, "shared": {"learn_config": asdict(LearnConfig.for_objective("balanced", 1))},
           "splits": [{"methods": {"learn": {"fit": {"first_layer": 29}}}}]}
    assert _learn_settings(res)[0] == ("learn: objective balanced, rank 4 on layers 29.., 200 steps "
                                       "(cosine rate, keeping the last step), one round.")
    res = {"config": {"methods": ["learn"]}, "shared": {"learn_config": asdict(LearnConfig())}, "splits": []}
    assert "on the last layer," in _learn_settings(res)[0] and "up to 5 rounds" in _learn_settings(res)[0]
    half = {"config": {"methods": ["learn"]}, "shared": {"learn_config": asdict(LearnConfig(layers=None))}, "splits": []}
    assert "on the upper half of the layers" in _learn_settings(half)[0]
    assert _learn_settings({"config": {"methods": ["steer"]}, "shared": res["shared"]}) == []


def test_a_pair_parts_where_its_first_different_token_is_predicted_and_batches_go_by_length() -> None:
    from bias.learn import by_length, parted_at

    seqs = [[1] * k for k in (5, 2, 9, 3, 2, 7)]
    batches = by_length(seqs, 4)
    assert sorted(i for b in batches for i in b) == list(range(6))  # each sequence once
    assert [len(seqs[i]) for b in batches for i in b] == [2, 2, 3, 5, 7, 9]

    assert parted_at([1, 5, 6, 7], [1, 5, 9, 7]) == 1  # position 1 predicts the first different token
    assert parted_at([1, 8, 6], [1, 9, 6, 4]) == 0
    assert parted_at([1, 5], [1, 5, 3]) == 1  # one a prefix of the other: the longer's extra token


def test_the_last_layer_rows_score_as_the_padded_forward_does(runtime) -> None:  # noqa: ANN001
    torch = pytest.importorskip("torch")
    from bias.audit import _sentence
    from bias.learn import PairData, TorchLlama, Trainer, parted_at

    texts = [("The nurse said she would be late.", "The nurse said he would be late."),
             ("She fixed the old car in an hour.", "He fixed the old car in an hour."),
             ("My neighbour, who is a teacher, plays chess every Sunday.",
              "My neighbour, who is a farmer, plays chess every Sunday."),
             ("Rain fell all day.", "Rain fell all day long over the hills.")]
    more = [_sentence(runtime, a)[0] for a, _ in texts]
    less = [_sentence(runtime, b)[0] for _, b in texts]
    neutral = [more[2][:12], less[1], more[0]]
    m = TorchLlama(runtime.path)
    top = m.n_layers - 1
    groups = np.array(["x"] * len(texts))
    padded = PairData(more, less, m.streams(more, top), m.streams(less, top), groups)
    first = [parted_at(a, b) for a, b in zip(more, less, strict=True)]
    assert first[0] > 0  # the shared start is dropped
    rows = PairData(more, less, [], [], groups, (m.rows(more, first), m.rows(less, first)))
    cfg = LearnConfig(layers=1)
    t_pad, t_rows = Trainer(m, padded, padded, neutral, top, cfg), Trainer(m, rows, rows, neutral, top, cfg)
    assert t_rows.packed and not t_pad.packed
    with torch.no_grad():
        t_pad.U.copy_(torch.randn(t_pad.U.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        t_pad.b.copy_(torch.randn(t_pad.b.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        for p, q in zip((t_rows.U, t_rows.V, t_rows.b), (t_pad.U, t_pad.V, t_pad.b), strict=True):
            p.copy_(q)
    before, edited = t_pad.diffs(padded, False), t_pad.diffs(padded)
    with torch.no_grad():  # the whole forward from the tokens: the streams went back to their own sequences
        whole = (m.seq_ll(more)[0] - m.seq_ll(less)[0]).numpy()
    np.testing.assert_allclose(before, whole, atol=2e-3)
    assert np.abs(edited - before).max() > 0.05  # the edit changes the differences ...
    np.testing.assert_allclose(t_rows.diffs(rows), edited, atol=2e-3)  # ... and both forwards agree
    np.testing.assert_allclose(t_rows.diffs(rows, False), before, atol=2e-3)
    lp_pad, mask = t_pad.neutral_lp(0, t_pad.edit)
    lp_rows, _ = t_rows.neutral_lp(0, t_rows.edit)
    assert lp_rows.shape[0] == int(mask.sum())  # no padded positions
    assert float((lp_pad[mask.bool()] - lp_rows).abs().max().detach()) < 2e-3


def _random_last_layer_plan(m: Any, seed: int) -> Any:
    """A small random rank-4 edit of the last layer's writes, with an MLP bias."""
    from edge.fold import FoldPlan, ResidualEdit

    g = np.random.default_rng(seed)
    return FoldPlan({m.n_layers - 1: ResidualEdit(*(g.normal(0, 0.05, shape).astype(np.float32)
                                                   for shape in ((m.n_embd, 4), (m.n_embd, 4), m.n_embd)))})


def test_held_out_pairs_and_ppl_from_the_shared_rows_match_the_whole_forward(runtime) -> None:  # noqa: ANN001
    """A split run judges the last layer's edit on rows read once (bias.learn.pair_parts,
    TorchUtility): the same differences, rewritten-token parts, PPL and KL as the whole forward."""
    torch = pytest.importorskip("torch")
    from bias.audit import _sentence, rewritten_tokens
    from bias.feedback import neutral_chunks
    from bias.learn import TorchLlama, TorchUtility, edit_of, pair_parts, parted_at

    texts = [("The nurse said she would be late.", "The nurse said he would be late."),
             ("My neighbour, who is a teacher, plays chess.", "My neighbour, who is a farmer, plays chess."),
             ("Rain fell all day.", "Rain fell all day long over the hills.")]
    more = [_sentence(runtime, a)[0] for a, _ in texts]
    less = [_sentence(runtime, b)[0] for _, b in texts]
    m = TorchLlama(runtime.path)
    plan = _random_last_layer_plan(m, 3)
    for e in (None, edit_of(plan)):
        a, b, words = pair_parts(m, more, less, e)
        with torch.no_grad():
            lm, lp_m, _ = m.seq_ll(more, e)
            ll, lp_l, _ = m.seq_ll(less, e)
        np.testing.assert_allclose(a - b, (lm - ll).numpy(), atol=2e-3)
        for i in range(len(texts)):
            ia, ib = rewritten_tokens(more[i][1:], less[i][1:])
            w = (sum(float(lp_m[i, j, more[i][j + 1]]) for j in ia) - sum(float(lp_l[i, j, less[i][j + 1]]) for j in ib))
            assert words[i] == pytest.approx(w, abs=2e-3)
    assert np.abs(pair_parts(m, more, less, edit_of(plan))[0] - pair_parts(m, more, less)[0]).max() > 0.05
    # part "rest": the rows predicting a rewritten token left out, so the pair's summed rows
    # are its shared tokens' part (difference − words), with and without the edit
    first = [parted_at(a, b) for a, b in zip(more, less, strict=True)]
    changed = [rewritten_tokens(a[1:], b[1:]) for a, b in zip(more, less, strict=True)]
    rm, rl = (m.rows(seqs, first, skip=[c[k] for c in changed]) for k, seqs in enumerate((more, less)))
    for e in (None, edit_of(plan)):
        a, b, words = pair_parts(m, more, less, e)
        np.testing.assert_allclose(m.row_sums(rm, e) - m.row_sums(rl, e), a - b - words, atol=2e-3)
        with torch.no_grad():  # and the whole forward's sums with those positions masked (an edit of more layers)
            sm, sl = (m.seq_ll(seqs, e, skip=[c[k] for c in changed])[0] for k, seqs in enumerate((more, less)))
        np.testing.assert_allclose((sm - sl).numpy(), a - b - words, atol=2e-3)
    assert len(rm.tgt) < len(m.rows(more, first).tgt)

    chunks = [c[:40] for c in neutral_chunks(runtime, 2, 64)]
    u = TorchUtility(m, chunks)
    with torch.no_grad():
        s0, lp0, mask = m.seq_ll(chunks)
        s1, lp1, _ = m.seq_ll(chunks, edit_of(plan))
    n = float(mask.sum())
    assert u.base_ppl == pytest.approx(float(np.exp(-float(s0.sum()) / n)), rel=1e-4)
    ppl, kl = u(edit_of(plan))
    assert ppl == pytest.approx(float(np.exp(-float(s1.sum()) / n)), rel=1e-4) and ppl != pytest.approx(u.base_ppl, rel=1e-4)
    assert kl == pytest.approx(float((lp0.exp() * (lp0 - lp1)).sum(-1).sum() / n), rel=1e-3) and kl > 0
    assert u(None) == (pytest.approx(u.base_ppl, rel=1e-6), pytest.approx(0.0, abs=1e-7))


@pytest.mark.skipif(not (SHARED_DATA / "bbq").exists(), reason="needs ../shared/data/bbq")
def test_bbq_answers_read_once_with_their_shared_context_score_as_each_whole_request(runtime) -> None:  # noqa: ANN001
    """A split run judges learn's edit on BBQ from rows read once (TorchLlama.answer_rows): an
    item's three answers packed after one copy of its context score as each request alone."""
    torch = pytest.importorskip("torch")
    from bias.audit import bbq_requests
    from bias.learn import TorchLlama, edit_of
    from bias.shared import bbq_sample

    reqs = bbq_requests(runtime, bbq_sample(f"bbq:{SHARED_DATA / 'bbq'}", 4, 0))  # 8 items (one a file and condition)
    reqs.append(([1, 504, 1148, 28], 2))  # a request whose context no other shares
    m = TorchLlama(runtime.path)
    plan = _random_last_layer_plan(m, 5)
    rows = m.answer_rows(reqs, n=3)
    assert len(rows.offsets) == len(reqs) + 1 and rows.offsets[-1] == sum(len(t) - f for t, f in reqs)
    got = [m.row_sums(rows, edit_of(e)) for e in (None, plan)]
    for e, packed in zip((None, plan), got, strict=True):
        with torch.no_grad():
            whole = [float(m.forward(torch.tensor([t]), edit_of(e))[0, f - 1:-1].gather(-1, torch.tensor(t[f:])[:, None]).sum())
                     for t, f in reqs]
        np.testing.assert_allclose(packed, whole, atol=2e-3)
    assert np.abs(got[1] - got[0]).max() > 0.05  # the edit reaches the answers
    with pytest.raises(ValueError, match="tokens before and after"):
        m.answer_rows([([1, 504], 2)])


def test_layers_below_the_edit_are_read_once_a_pass_and_give_the_same_rows(runtime) -> None:  # noqa: ANN001
    """TorchLlama(keep_from=L) holds layers L.. only and reads each lower one once a pass,
    every batch through it before the next (so a 7B's fit holds a layer, not the model):
    the rows, answers and streams equal those of the model held whole."""
    torch = pytest.importorskip("torch")
    from bias.learn import TorchLlama, check_memory

    whole = TorchLlama(runtime.path)
    top = whole.n_layers - 1
    low = TorchLlama(runtime.path, keep_from=top)
    assert sorted(low.layers) == [top] and len(whole.layers) == whole.n_layers
    reads: list[int] = []
    read = low._read
    low._read = lambda il: (reads.append(il), read(il))[1]  # type: ignore[method-assign]
    seqs = [[1, 504, 1148, 28, 9], [1, 504, 1148, 30], [1, 28, 9], [1, 9, 28, 30, 31, 40], [1, 40, 41]]
    reqs = [([1, 504, 1148, 28], 2), ([1, 504, 1148, 29], 2), ([1, 30, 31, 32], 3)]
    for m in (whole, low):
        m.read_rows(seqs, n=2)  # three batches
    assert reads == list(range(top)) and low._held is None  # each lower layer once, none held after
    for k, (x, wa) in whole._rows.items():
        assert torch.equal(low._rows[k][0], x) and torch.equal(low._rows[k][1], wa)
    # further lists in the same pass, each batched on its own: the same bits as a pass each
    more, other = [[1, 77, 78, 79], [1, 80, 81], seqs[0]], [[1, 90, 91, 92, 93], [1, 94, 95]]
    apart = TorchLlama(runtime.path, keep_from=top)
    apart.read_rows(more, n=2)
    apart.read_rows(other, n=2)
    reads.clear()
    assert low.read_rows(more, other, n=2) == 4 and reads == list(range(top))  # seqs[0] was read already
    for k in map(tuple, more + other):
        assert torch.equal(low._rows[k][0], apart._rows[k][0]) and torch.equal(low._rows[k][1], apart._rows[k][1])
    reads.clear()
    a_whole, a_low = whole.answer_rows(reqs, n=1), low.answer_rows(reqs, n=1)
    assert reads == list(range(top))
    np.testing.assert_array_equal(low.row_sums(a_low), whole.row_sums(a_whole))
    for x, y in zip(low.streams(seqs, 20, n=2), whole.streams(seqs, 20, n=2), strict=True):
        assert torch.equal(x, y)
    low.keep(top - 2)  # a deeper edit holds its layers from then on
    assert sorted(low.layers) == [top - 2, top - 1, top] and low.keep_from == top - 2
    # memory: the lower layers are not counted, but the largest of them once
    layer = 4 * sum(int(t.numel()) for t in (*whole.layers[0][0].values(), *whole.layers[0][1:]))
    assert check_memory(runtime.path, available=64 << 30) - check_memory(runtime.path, available=64 << 30,
                                                                       keep_from=top) == (top - 1) * layer


def test_kept_rows_come_back_as_read_and_only_for_the_same_weights_and_tokens(runtime, tmp_path: Path) -> None:  # noqa: ANN001
    """A rerun reads learn's last-layer inputs from the run's folder (bias.learn.KeptRows):
    the same tensors, for the same weights and token lists only; a foreign file is no cache."""
    pytest.importorskip("torch")
    from bias.learn import KeptRows, TorchLlama

    m = TorchLlama(runtime.path)
    seqs = [[1, 504, 1148, 28, 9], [1, 504, 1148, 30]]
    reqs = [([1, 504, 1148, 28], 2), ([1, 504, 1148, 29], 2)]
    m.read_rows(seqs)
    answers = m.answer_rows(reqs)
    key = KeptRows.key(runtime.path, seqs, reqs)
    path = tmp_path / "rows.pt"
    KeptRows(m._rows, answers).save(path, key)
    got = KeptRows.load(path, key)
    assert got is not None and got.rows.keys() == m._rows.keys() and got.answers is not None
    for k, (x, wa) in m._rows.items():
        assert (got.rows[k][0] == x).all() and (got.rows[k][1] == wa).all()
    np.testing.assert_array_equal(got.answers.offsets, answers.offsets)
    np.testing.assert_array_equal(m.row_sums(got.answers), m.row_sums(answers))
    assert KeptRows.load(path, KeptRows.key(runtime.path, seqs[:1], reqs)) is None  # other sentences
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x")
    assert KeptRows.load(path, KeptRows.key(other, seqs, reqs)) is None  # other weights
    path.write_bytes(b"not a torch file")
    assert KeptRows.load(path, key) is None and KeptRows.load(tmp_path / "absent.pt", key) is None


def test_pairs_balanced_weighs_every_category_alike_and_its_batches_estimate_that() -> None:
    from bias.learn import balanced_weights

    rng = np.random.default_rng(1)
    groups = np.array(["race"] * 60 + ["age"] * 6 + ["religion"] * 3)
    d = np.concatenate([rng.normal(0, 1, 60), rng.normal(3, 1, 6), rng.normal(-2, 1, 3)])
    target = np.mean([np.mean(d[groups == g] ** 2) for g in ("race", "age", "religion")])
    assert balanced_weights(groups) @ d ** 2 == pytest.approx(target)
    assert target > 2 * np.mean(d ** 2)  # the small categories' large differences count for a third each
    # Trainer.draw's batches: the same number from each category (all of a smaller one)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    est = [balanced_weights(groups[j]) @ d[j] ** 2 for j in
           (np.concatenate([rng.choice(ix, min(4, len(ix)), replace=False) for ix in members]) for _ in range(4000))]
    assert np.mean(est) == pytest.approx(target, rel=0.03)
    assert LearnConfig.for_objective("pairs-balanced").rounds == LearnConfig().rounds  # the budget loop, as pairs


def test_the_guard_takes_away_from_neutral_as_up_unless_a_category_is_reliably_below_zero() -> None:
    from bias.learn import guard_signs
    from edge.errors import BadOptionError

    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(-3, 1, 40), rng.normal(-0.2, 3, 20), rng.normal(2, 1, 30)])
    groups = np.array(["race"] * 40 + ["age"] * 20 + ["religion"] * 30)
    # race: below 0 by many SE, so down is away; age: a noisy mean below 0 says nothing, up is away
    assert guard_signs(d, groups) == {"age": 1.0, "race": -1.0, "religion": 1.0}
    with pytest.raises(BadOptionError, match="guard"):
        LearnConfig(guard=-1.0).validate()
