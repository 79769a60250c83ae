"""Score a bias suite with a model's log-likelihoods, per category, with bootstrap CIs.

CrowS-Pairs / probes: the summed log-likelihood of each sentence after BOS (as
lm-evaluation-harness scores crows_pairs), and its difference split in two: the rewritten
tokens' own log-probability and the tokens the two sentences share. The second is the
left-to-right counterpart of the CrowS-Pairs authors' own score, which counts only the
shared ("unmodified") tokens given the rewritten ones, so that how common a group word
is does not count (nyu-mll/crows-pairs, metric.py). The first is often just that rarity:
on SmolLM2-135M and the full CrowS-Pairs, race-color's −1.01 nats is −1.22 from the
rewritten words and +0.21 from the rest, and the −1.22 is a tail of rare, many-token
words on the stereotyped side ("Asian-Americans" against "White Americans": −12.7 nats),
while its 142 "black"/"white" pairs give +0.52. BBQ: "context\\n\\nQ: question\\nA:" followed by
each answer; the answer with the highest summed log-likelihood is chosen. StereoSet:
mean per-token log-likelihood of each filled-in sentence (as the StereoSet authors score
GPT-2, so sentences of different lengths compare fairly).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bias import metrics as M
from bias.scorer import BatchScorer
from bias.suites import Suite, load_suite
from edge.runtime import Runtime

Progress = Callable[[int], None]


@dataclass
class AuditResult:
    suite: str
    kind: str
    source: str
    n_items: int
    skipped_rows: int
    overall: dict[str, M.Estimate]
    per_category: dict[str, dict[str, M.Estimate]]
    items: list[dict[str, Any]] = field(repr=False)
    score_s: float = 0.0
    tokens_decoded: int = 0
    correction: str | None = None
    correction_scale: float | None = None
    compute: dict[str, Any] = field(default_factory=dict)  # weights and batch layout scored with

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("overall", "per_category", "items")}
        d["overall"] = {k: e.to_dict() for k, e in self.overall.items()}
        d["per_category"] = {c: {k: e.to_dict() for k, e in m.items()}
                             for c, m in self.per_category.items()}
        if with_items:
            d["items"] = self.items
        return d


# ---- scoring -----------------------------------------------------------------------------
def _sentence(rt: Runtime, text: str) -> tuple[list[int], int]:
    return [rt.llm.token_bos(), *rt.tokenize(text, add_bos=False)], 1


@dataclass
class PairScores:
    """Per pair: summed log-likelihood of each sentence, and how much of their difference
    the rewritten tokens make (CrowS-Pairs' "modified" tokens); the rest is the tokens the
    two sentences share (its "unmodified" ones)."""

    more: np.ndarray
    less: np.ndarray
    words: np.ndarray  # ll of more's rewritten tokens − ll of less's

    @property
    def rest(self) -> np.ndarray:
        return (self.more - self.less) - self.words


def rewritten_tokens(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Indices of the tokens of a and of b outside the runs the two share (difflib's
    matching blocks, as the CrowS-Pairs authors align words): what the rewrite changed,
    wherever in the sentence ("He ... his" against "She ... her" has two such places)."""
    import difflib

    same_a, same_b = set(), set()
    for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        same_a.update(range(m.a, m.a + m.size))
        same_b.update(range(m.b, m.b + m.size))
    return [i for i in range(len(a)) if i not in same_a], [i for i in range(len(b)) if i not in same_b]


def shared_after_rewrite(a: list[int], b: list[int]) -> list[tuple[int, int]]:
    """Aligned positions (i, j) of the states of a and b that predict a shared token once
    the two have differed: for each token of the runs they share, at (i + 1, j + 1), the
    states at i and j, from the first rewritten token on (before it both prefixes are the
    same). What the stream there carries of the rewrite is what the shared tokens' part of
    PairScores is computed from."""
    import difflib

    blocks = [m for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() if m.size]
    first = blocks[0].size if blocks and blocks[0].a == 0 and blocks[0].b == 0 else 0
    return [(m.a + k - 1, m.b + k - 1) for m in blocks for k in range(m.size)
            if m.a + k - 1 >= first and m.b + k - 1 >= first]


def score_pair_parts(scorer: BatchScorer, suite: Suite, on_progress: Progress | None = None) -> PairScores:
    """Each pair's sentence log-likelihoods and their rewritten tokens' part, from one scoring pass."""
    rt = scorer.rt
    reqs = [_sentence(rt, s) for it in suite.items for s in (it.more, it.less)]
    res = scorer.score(reqs, on_progress=_halve(on_progress))
    words = np.empty(len(suite.items))
    for i in range(len(words)):
        # res[k][j] scores token j after BOS
        ia, ib = rewritten_tokens(reqs[2 * i][0][1:], reqs[2 * i + 1][0][1:])
        words[i] = res[2 * i][ia].sum() - res[2 * i + 1][ib].sum()
    sums = np.array([r.sum() for r in res])
    return PairScores(sums[0::2], sums[1::2], words)


def score_pairs(scorer: BatchScorer, suite: Suite, on_progress: Progress | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(ll_more, ll_less): summed log-likelihood of each sentence of each pair."""
    s = score_pair_parts(scorer, suite, on_progress)
    return s.more, s.less


def bbq_requests(rt: Runtime, suite: Suite) -> list[tuple[list[int], int]]:
    """3 requests per item; context and question tokens are shared, answers differ."""
    reqs = []
    bos = rt.llm.token_bos()
    for it in suite.items:
        ctx = f"{it.context}\n\nQ: {it.question}\nA:"
        ctx_ids = rt.tokenize(ctx, add_bos=False)
        for ans in it.answers:
            # As lm-evaluation-harness: the continuation is what the whole adds to the context.
            whole = rt.tokenize(f"{ctx} {ans}", add_bos=False)
            reqs.append(([bos, *ctx_ids, *whole[len(ctx_ids):]], len(ctx_ids) + 1))
    return reqs


def score_bbq(scorer: BatchScorer, suite: Suite, *, share_prefix: bool = True,
              on_progress: Progress | None = None) -> np.ndarray:
    """(n_items, 3) summed log-likelihood of each answer."""
    reqs = bbq_requests(scorer.rt, suite)
    prog = (lambda k: on_progress(k / 3)) if on_progress else None  # noqa: E731
    res = scorer.score(reqs, share_prefix=share_prefix, on_progress=prog)
    return np.array([r.sum() for r in res]).reshape(-1, 3)


def score_stereoset(scorer: BatchScorer, suite: Suite, on_progress: Progress | None = None,
                    ) -> np.ndarray:
    """(n_items, 3) mean per-token log-likelihood of stereotype, anti-stereotype, unrelated."""
    rt = scorer.rt
    reqs = [_sentence(rt, s) for it in suite.items for s in (it.stereo, it.anti, it.unrelated)]
    prog = (lambda k: on_progress(k / 3)) if on_progress else None  # noqa: E731
    return np.array([r.mean() for r in scorer.score(reqs, on_progress=prog)]).reshape(-1, 3)


def _halve(on_progress: Progress | None) -> Progress | None:
    return (lambda k: on_progress(k / 2)) if on_progress else None  # noqa: E731


# ---- metrics -----------------------------------------------------------------------------
PAIR_METRICS: dict[str, M.Stat] = {
    "pct_stereotype": M.pct_stereotype,
    "likelihood_diff": M.likelihood_diff,
    "mean_ll_diff": M.mean_ll_diff,
}
STEREOSET_METRICS: dict[str, M.Stat] = {"ss": M.ss_score, "lms": M.lm_score, "icat": M.icat}


def _table(stats: dict[str, M.Stat], arrays: list[np.ndarray], cats: np.ndarray, n_boot: int,
           ) -> tuple[dict[str, M.Estimate], dict[str, dict[str, M.Estimate]]]:
    overall = {k: M.bootstrap(f, arrays, n_boot=n_boot) for k, f in stats.items()}
    per: dict[str, dict[str, M.Estimate]] = {}
    for c in sorted(set(cats.tolist())):
        mask = cats == c
        per[c] = {k: M.bootstrap(f, [a[mask] for a in arrays], n_boot=n_boot) for k, f in stats.items()}
    return overall, per


def bbq_tables(lls: np.ndarray, suite: Suite, n_boot: int,
               ) -> tuple[dict[str, M.Estimate], dict[str, dict[str, M.Estimate]], np.ndarray]:
    items = suite.items
    pred = lls.argmax(axis=1)
    correct, biased, not_unknown = M.bbq_item_flags(
        pred, np.array([i.label for i in items]), np.array([i.target for i in items]),
        np.array([i.unknown for i in items]), np.array([i.polarity == "neg" for i in items]))
    amb = np.array([i.ambiguous for i in items])
    cats = np.array([i.category for i in items])

    def one(mask: np.ndarray) -> dict[str, M.Estimate]:
        a, d = mask & amb, mask & ~amb
        return {
            "acc_amb": M.bootstrap(M.accuracy, [correct[a]], n_boot=n_boot),
            "acc_dis": M.bootstrap(M.accuracy, [correct[d]], n_boot=n_boot),
            "s_dis": M.bootstrap(M.bbq_bias, [biased[d], not_unknown[d]], n_boot=n_boot),
            "s_amb": M.bootstrap(M.bbq_amb_bias, [correct[a], biased[a], not_unknown[a]], n_boot=n_boot),
        }

    per = {c: one(cats == c) for c in sorted(set(cats.tolist()))}
    return one(np.ones(len(items), bool)), per, pred


def summarize(suite: Suite, scores: Any, n_boot: int = M.N_BOOT) -> tuple[
        dict[str, M.Estimate], dict[str, dict[str, M.Estimate]], list[dict[str, Any]]]:
    cats = np.array([it.category for it in suite.items])
    base = [{"id": it.id, "row": it.row, "category": it.category} for it in suite.items]
    if suite.kind == "pairs":
        more, less = (scores.more, scores.less) if isinstance(scores, PairScores) else scores
        overall, per = _table(PAIR_METRICS, [more, less], cats, n_boot)
        rows = [b | {"ll_more": float(m), "ll_less": float(lv)} for b, m, lv in zip(base, more, less, strict=True)]
        if isinstance(scores, PairScores):
            _add_parts(scores, cats, overall, per, rows, n_boot)
    elif suite.kind == "bbq":
        overall, per, pred = bbq_tables(scores, suite, n_boot)
        rows = [b | {"ll": [float(x) for x in s], "pred": int(p), "label": it.label,
                     "ambiguous": it.ambiguous}
                for b, s, p, it in zip(base, scores, pred, suite.items, strict=True)]
    else:
        overall, per = _table(STEREOSET_METRICS, [scores[:, 0], scores[:, 1], scores[:, 2]], cats, n_boot)
        rows = [b | {"ll_stereo": float(s[0]), "ll_anti": float(s[1]), "ll_unrelated": float(s[2])}
                for b, s in zip(base, scores, strict=True)]
    return overall, per, rows


def _add_parts(s: PairScores, cats: np.ndarray, overall: dict[str, M.Estimate],
               per: dict[str, dict[str, M.Estimate]], rows: list[dict[str, Any]], n_boot: int) -> None:
    """mean_ll_diff's two parts: the rewritten tokens and the shared ones (the rest), and the
    rest's pct, the CrowS-Pairs paper's way of counting (its shared tokens only)."""
    for k, f, x in (("words_ll_diff", M.mean_of, s.words), ("rest_ll_diff", M.mean_of, s.rest),
                    ("rest_pct_stereotype", M.pct_positive, s.rest)):
        overall[k] = M.bootstrap(f, [x], n_boot=n_boot)
        for c, d in per.items():
            d[k] = M.bootstrap(f, [x[cats == c]], n_boot=n_boot)
    for r, w in zip(rows, s.words, strict=True):
        r["ll_words_diff"] = float(w)


def score_suite(scorer: BatchScorer, suite: Suite, on_progress: Progress | None = None) -> Any:
    if suite.kind == "pairs":
        return score_pair_parts(scorer, suite, on_progress)
    if suite.kind == "bbq":
        return score_bbq(scorer, suite, on_progress=on_progress)
    return score_stereoset(scorer, suite, on_progress)


def audit_suite(rt: Runtime, suite: Suite, *, n_boot: int = M.N_BOOT,
                on_progress: Progress | None = None, scorer: BatchScorer | None = None,
                ) -> AuditResult:
    """Score `suite` with the model loaded in `rt` (and its control vector, if any)."""
    own = scorer is None
    scorer = scorer or BatchScorer(rt)
    try:
        t0 = time.perf_counter()
        n0 = scorer.tokens_decoded
        scores = score_suite(scorer, suite, on_progress)
        elapsed = time.perf_counter() - t0
        overall, per, rows = summarize(suite, scores, n_boot)
        return AuditResult(suite.name, suite.kind, suite.source, len(suite.items), suite.skipped,
                           overall, per, rows, elapsed, scorer.tokens_decoded - n0)
    finally:
        if own:
            scorer.close()


def open_scorer(rt: Runtime, precision: str = "auto") -> BatchScorer:
    """A scorer on the weights `precision` picks (edge.dequant); `.record()` says which."""
    from edge.dequant import resolve_compute

    comp = resolve_compute(rt.info, precision, threads=rt.threads)
    scorer = BatchScorer(rt, model_path=None if comp.path == comp.source else comp.path)
    scorer.compute = comp.to_dict()
    return scorer


def audit(model: str | None, suite_spec: str, *, limit: int | None = None,
          correction: str | None = None, correction_scale: float = 1.0, threads: int | None = None,
          precision: str = "auto", n_boot: int = M.N_BOOT, on_start: Callable[[int], None] | None = None,
          on_progress: Progress | None = None) -> tuple[AuditResult, Runtime]:
    """Load MODEL and the suite, apply the correction vector if given, score. Caller closes rt."""
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    suite = load_suite(suite_spec, limit=limit)
    rt = open_runtime(model, RuntimeConfig(n_ctx=512, threads=threads), correction=correction,
                      correction_scale=correction_scale)
    scorer = None
    try:
        scorer = open_scorer(rt, precision)
        if on_start:
            on_start(len(suite.items))
        res = audit_suite(rt, suite, n_boot=n_boot, on_progress=on_progress, scorer=scorer)
        res.compute = scorer.record()
    except BaseException:
        rt.close()
        raise
    finally:
        if scorer is not None:
            scorer.close()
    res.correction = str(correction) if correction else None
    res.correction_scale = correction_scale if correction else None
    return res, rt
