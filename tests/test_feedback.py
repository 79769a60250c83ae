"""The feedback loop's split and iterations on the bundled model (tiny calibration set)."""

from __future__ import annotations

import numpy as np
import pytest

from bias.feedback import (
    BlockProbe,
    LoopConfig,
    allocate,
    blocks,
    neutral_chars,
    neutral_chunks,
    run_loop,
    split,
    utility_chunks,
)
from bias.scorer import BatchScorer
from bias.steering import compute_directions
from bias.suites import load_suite
from edge.errors import BadOptionError
from tests.test_bias_suites import CROWS


def test_split_is_stratified_random_and_reproducible() -> None:
    s = load_suite(f"crows_pairs:{CROWS}")
    cal, held = split(s, 0.3, seed=0, exclude="disability")
    assert split(s, 0.3, seed=0, exclude="disability") == (cal, held)
    assert split(s, 0.3, seed=1, exclude="disability")[0] != cal
    assert sorted(cal + held) == list(range(len(s.items))) and not set(cal) & set(held)
    cats = np.array([it.category for it in s.items])
    assert not any(cats[i] == "disability" for i in cal)
    for c in set(cats) - {"disability"}:
        n = int((cats == c).sum())
        assert abs(sum(cats[i] == c for i in cal) - 0.3 * n) <= 1
    # never a contiguous block: calibration rows spread over the ordered file
    assert min(cal) < 50 and max(cal) > 1450 and max(np.diff(cal)) < 60


def test_allocation_follows_bias_drop_per_ppl_cost() -> None:
    w = np.ones(5)
    probes = [BlockProbe(1, 2, drop=1.0, cost=1.0), BlockProbe(3, 4, drop=2.0, cost=0.5)]
    k = allocate(w, probes)
    np.testing.assert_allclose(k, [0.4, 1.6])  # ∝ drop/cost = 1, 4; mean over layers 1..4 is 1
    k = allocate(w, [BlockProbe(1, 2, drop=-1.0, cost=1.0), BlockProbe(3, 4, drop=1.0, cost=1.0)])
    np.testing.assert_allclose(k, [0.0, 2.0])  # a block that raises bias gets no push
    assert allocate(w, [BlockProbe(1, 4, drop=-0.5, cost=1.0)]) is None
    assert blocks(30, 6) == [(1, 5), (6, 10), (11, 15), (16, 19), (20, 24), (25, 29)]


@pytest.mark.slow
def test_loop_logs_iterations_and_respects_the_budget(runtime) -> None:
    suite = load_suite("probes").subset([0, 60])
    rng = np.random.default_rng(0)
    n_layers, n_embd = runtime.info.n_layers, runtime.info.n_embd
    less = rng.standard_normal((8, n_layers, n_embd)).astype(np.float32)
    d = compute_directions(less + 0.5, less, "mean")
    neutral = [[runtime.llm.token_bos(), *runtime.tokenize(t, add_bos=False)]
               for t in ("def f(x):\n    return x + 1\n", "The river runs to the sea.")]
    events = []
    with BatchScorer(runtime, n_batch=256, n_seq=16) as sc:
        res = run_loop(sc, suite, d, LoopConfig(max_iter=1, max_ppl_increase=0.02, n_blocks=2),
                       neutral, on_event=lambda k, e: events.append(e))
        assert sc._buf is None  # the loop leaves the scoring context clean
        # Given the uncorrected scores and a Utility that has measured the uncorrected model
        # (the split runner has both), the loop starts from them: one scoring fewer, and
        # the same iterations.
        import bias.feedback as fb

        u = fb.Utility(sc, neutral)
        u()
        base = (*fb.score_pairs(sc, suite), u)
        calls = []
        real = fb.score_pairs
        fb.score_pairs = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            again = run_loop(sc, suite, d, LoopConfig(max_iter=1, max_ppl_increase=0.02, n_blocks=2),
                             neutral, base=base)
        finally:
            fb.score_pairs = real
    its = res.iterations
    assert len(calls) == len(its) - 1 and [it.phase for it in again.iterations] == [it.phase for it in its]
    for a, b in zip(again.iterations, its, strict=True):
        assert a.mean_ll_diff == pytest.approx(b.mean_ll_diff, abs=0.02)
        assert a.ppl == pytest.approx(b.ppl, rel=1e-3)
    assert [it.phase for it in its] == ["base", "probe L1-L15", "probe L16-L29", "gain"]
    assert len(events) == len(its) and its[0].kl == 0 and its[1].kl > 0
    assert its[0].gain == 0 and its[0].ppl_increase == 0
    # each probe's measured drop is what the log shows
    assert res.probes[0].drop == pytest.approx((its[0].mean_ll_diff - its[1].mean_ll_diff) / 0.6)
    chosen = [it for it in its if it.gain == res.gain][0]
    assert chosen.feasible and chosen.ppl_increase <= 0.02
    np.testing.assert_allclose(res.coefficients, res.gain * res.weights)
    if res.weights is not None and res.weights[1:].any():  # SNR shape kept within each block
        for a, b in blocks(n_layers, 2):
            r = res.weights[a : b + 1] / (d.snr[a : b + 1] / d.snr[1:].mean())
            np.testing.assert_allclose(r, r[0], rtol=1e-5)


def test_bad_loop_config() -> None:
    with pytest.raises(BadOptionError):
        LoopConfig(target=1.5).validate()
    with pytest.raises(BadOptionError):
        LoopConfig(calib_frac=1.0).validate()
    # --ppl-tokens is checked with the rest, before any model is loaded
    from bias.splits import SplitsConfig

    for cfg in (LoopConfig(ppl_tokens=4096), SplitsConfig(ppl_tokens=32)):
        with pytest.raises(BadOptionError, match="--ppl-tokens"):
            cfg.validate()


def test_utility_in_float32_blocks_equals_the_float64_formula(runtime) -> None:
    """The utility's PPL and KL (float32, row blocks) against edge.logprobs' float64
    formulas on the same logits: PPL within 1e-6 relative, KL within 1e-3 relative."""
    from bias.feedback import Utility
    from edge.logprobs import kl_rows, log_softmax

    texts = ["def f(x):\n    return x + 1\n" * 3, "The river runs to the sea, and the sea is never full. " * 2]
    chunks = [[runtime.llm.token_bos(), *runtime.tokenize(t, add_bos=False)] for t in texts]
    assert any(len(c) - 1 > Utility.BLOCK for c in chunks)  # more than one block per chunk
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((runtime.info.n_layers, runtime.info.n_embd)).astype(np.float32)
    with BatchScorer(runtime, n_batch=256, n_seq=16) as sc:
        u = Utility(sc, chunks)
        ppl0, kl0 = u()
        base = [np.array(sc.next_logits(c), np.float64) for c in chunks]
        sc.set_control_vector(vec, 0.5)
        ppl1, kl1 = u()
        after = [np.array(sc.next_logits(c), np.float64) for c in chunks]

    def ppl(logits: list[np.ndarray]) -> float:
        nll = sum(-log_softmax(lg)[np.arange(len(lg)), c[1:]].sum() for lg, c in zip(logits, chunks, strict=True))
        return float(np.exp(nll / sum(len(lg) for lg in logits)))

    kl = float(np.concatenate([kl_rows(b, a) for b, a in zip(base, after, strict=True)]).mean())
    assert kl0 == 0 and kl > 1e-3  # the vector moved the distributions
    assert ppl0 == pytest.approx(ppl(base), rel=1e-6) and ppl1 == pytest.approx(ppl(after), rel=1e-6)
    assert ppl1 != pytest.approx(ppl0, rel=1e-3)
    assert kl1 == pytest.approx(kl, rel=1e-3)


def test_the_utility_reads_the_tokens_asked_for_in_equal_chunks_before_the_text_fits_read(runtime) -> None:  # noqa: ANN001
    """--ppl-tokens: fewer tokens for a slow device, in ≤ 512-token chunks from BOS; never
    more than the default, whose text ends where gate and erase start fitting."""
    for tokens, (n, size) in ((2048, (4, 512)), (1000, (2, 500)), (512, (1, 512)), (64, (1, 64))):
        chunks = utility_chunks(runtime, tokens)
        assert [len(c) for c in chunks] == [size] * n
        assert all(c[0] == runtime.llm.token_bos() for c in chunks)
    assert utility_chunks(runtime) == neutral_chunks(runtime)  # the default is what the loops always read
    text = runtime.detokenize([t for c in utility_chunks(runtime, 2048) for t in c[1:]])
    assert len(text) <= neutral_chars()
    for bad in (32, 4096):
        with pytest.raises(BadOptionError, match=f"--ppl-tokens {bad}: use 64 to 2048"):
            utility_chunks(runtime, bad)
