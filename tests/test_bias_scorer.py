"""The batched scorer against llama.cpp one-sequence log-probs (the Runtime's own path).

The scorer aligns each token's batch row to its position (mod the kernels' row period, 8 on
AVX2 and 16 on AVX512, measured by its probe), so from-scratch scoring
matches the one-sequence decode to float precision, whatever shares the batch. With shared
prefixes, attention sums over KV cells in a different lane order: up to ~0.06 nats here;
masking or position bugs give errors of whole nats.
"""

from __future__ import annotations

import numpy as np
import pytest

from bias.audit import bbq_requests, score_bbq, shared_after_rewrite
from bias.scorer import BatchScorer
from bias.suites import load_suite
from tests.test_bias_suites import DATA


@pytest.fixture(scope="module")
def scorer(runtime):
    sc = BatchScorer(runtime, n_batch=256, n_seq=8)
    yield sc
    sc.close()


def test_batched_scores_equal_single_sequence_logprobs(runtime, scorer) -> None:
    bos = runtime.llm.token_bos()
    texts = ["The nurse said she was tired.", "The nurse said he was tired.",
             "Rivers flow to the sea.", "The nurse"]
    reqs = [([bos, *runtime.tokenize(t, add_bos=False)], 1) for t in texts]
    reqs.append((reqs[2][0], 3))  # score only the tail of a sequence
    shared = scorer.score(reqs)
    alone = scorer.score(reqs, share_prefix=False)
    for (toks, start), a, b in zip(reqs, shared, alone, strict=True):
        ref = runtime.token_logprobs(toks)[start - 1:]
        assert a.shape == ref.shape
        np.testing.assert_allclose(a, ref, atol=0.1)
        np.testing.assert_allclose(b, ref, atol=1e-4)
    # the pair's common prefix was decoded once: fewer tokens than the requests hold
    n = scorer.tokens_decoded
    scorer.score(reqs[:2])
    assert scorer.tokens_decoded - n < len(reqs[0][0]) + len(reqs[1][0])


def test_bbq_shared_context_equals_from_scratch(scorer) -> None:
    suite = load_suite(f"bbq:{DATA / 'bbq' / 'Age.jsonl'}", limit=3)
    reqs = bbq_requests(scorer.rt, suite)
    assert all(r[0][: r[1]] == reqs[3 * (i // 3)][0][: r[1]] for i, r in enumerate(reqs))
    a = score_bbq(scorer, suite)
    n0 = scorer.tokens_decoded
    b = score_bbq(scorer, suite, share_prefix=False)
    scratch = scorer.tokens_decoded - n0
    assert a.shape == (3, 3)
    np.testing.assert_allclose(a, b, atol=0.15)
    assert scratch > 2 * sum(len(r[0]) for r in reqs[0::3])  # each answer re-decoded the context


def test_shared_after_rewrite_pairs_the_states_that_predict_shared_tokens() -> None:
    # BOS 5 | 6 vs 10 11 | 7 8 9: the states before 7, 8, 9 (a's 2-4, b's 3-5)
    assert shared_after_rewrite([1, 5, 6, 7, 8, 9], [1, 5, 10, 11, 7, 8, 9]) == [(2, 3), (3, 4), (4, 5)]
    # two rewritten places ("He ... his"): a's 4 predicts the second rewrite, so it is left out
    assert shared_after_rewrite([1, 5, 6, 7, 8, 12, 9], [1, 5, 10, 7, 8, 13, 9]) == [(2, 2), (3, 3), (5, 5)]
    assert shared_after_rewrite([1, 5, 6], [1, 5, 7]) == []  # the rewrite ends the sentence
    assert shared_after_rewrite([1, 6, 9], [1, 7, 9]) == [(1, 1)]


def test_pair_parts_split_the_difference_at_the_rewritten_words(runtime, scorer) -> None:
    """words + rest is the whole difference; each part equals llama.cpp's one-sequence
    log-probs summed over the tokens a hand count puts there."""
    from bias.audit import score_pair_parts, summarize
    from bias.suites.base import PairItem, Suite

    tok = lambda t: runtime.tokenize(t, add_bos=False)  # noqa: E731
    # a piece is shared text or a (more, less) rewrite
    pairs = [["The nurse said", (" she", " he"), " was tired."],          # one token each, a tail after
             ["We met the", (" Norwegian", " zebra"), " at noon."],       # spans of different lengths
             ["Tea is served by the", (" grandmother", " doorman")],      # nothing after the words
             ["The nurse said", (" she", " he"), " was tired, so", (" she", " he"), " slept."]]  # two places
    side = lambda pc, k: "".join(x if isinstance(x, str) else x[k] for x in pc)  # noqa: E731
    items = [PairItem(str(i), i, "c" if i else "d", side(pc, 0), side(pc, 1)) for i, pc in enumerate(pairs)]
    s = score_pair_parts(scorer, Suite("t", "pairs", items, "test"))
    np.testing.assert_allclose(s.words + s.rest, s.more - s.less, atol=1e-9)
    bos = runtime.llm.token_bos()
    for i, pc in enumerate(pairs):
        parts = []
        for k in (0, 1):
            toks, rewritten = [], []
            for x in pc:
                t = tok(x if isinstance(x, str) else x[k])
                rewritten += [not isinstance(x, str)] * len(t)
                toks += t
            assert tok(side(pc, k)) == toks  # the hand count holds
            lp = runtime.token_logprobs([bos, *toks])
            parts.append((lp[np.array(rewritten)].sum(), lp[~np.array(rewritten)].sum()))
        words, rest = parts[0][0] - parts[1][0], parts[0][1] - parts[1][1]
        assert abs(s.words[i] - words) < 0.1 and abs(s.rest[i] - rest) < 0.1
    # nothing after the words leaves no rest; the parts are tens of times the 0.1 tolerance
    assert abs(s.rest[2]) < 1e-9 and np.abs(s.words).max() > 1 and np.abs(s.rest).max() > 1
    overall, per, rows = summarize(Suite("t", "pairs", items, "test"), s, n_boot=200)
    assert abs(overall["words_ll_diff"].value + overall["rest_ll_diff"].value - overall["mean_ll_diff"].value) < 1e-9
    assert per["c"]["words_ll_diff"].n == 3 and rows[1]["ll_words_diff"] == s.words[1]


def test_packing_is_dense_and_order_free(runtime) -> None:
    """Tokens interleave on aligned rows: few pads; from scratch, the same scores in any order."""
    from bias.audit import _sentence

    suite = load_suite(f"crows_pairs:{DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}", limit=40)
    reqs = [(_sentence(runtime, s)[0], 1) for it in suite.items for s in (it.more, it.less)]
    with BatchScorer(runtime, n_batch=256, n_seq=64) as sc:
        shared = sc.score(reqs)
        # One request after another pads ~28%; interleaving on 8-row periods (AVX2) ~13%.
        # A 16-row period (AVX512's Q4_1 kernels) leaves few places to interleave: 30% measured.
        limit = 0.2 if sc.measure_layout().period == 8 else 0.35
        assert sc.pad_tokens < limit * sc.tokens_decoded
        fwd = sc.score(reqs, share_prefix=False)
        back = sc.score(reqs[::-1], share_prefix=False)[::-1]
    for a, b, c in zip(fwd, back, shared, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(c, a, atol=0.3)  # summation order only; bugs cost nats


def test_row_period_is_the_smallest_exact_repeat() -> None:
    from bias.scorer import row_period

    avx2 = [0.0, 0.17, 0.11, 0.14, 0.11, 0.11, 0.11, 0.14, 0.0, 0.17, 0.11, 0.14, 0.11, 0.11, 0.11, 0.14, 0.0]
    avx512 = [0.0, 0.17, 0.0, 0.14, 0.11, 0.11, 0.11, 0.11, 0.13, 0.0, 0.14, 0.11, 0.11, 0.11, 0.14, 0.0, 0.0]
    assert row_period(avx2) == 8 and row_period(avx512) == 16  # measured on such hosts
    assert row_period([0.0] + [0.004] * 16) == 16  # never exact: the widest period we know
