"""What every split of a mitigation run shares, computed once: the uncorrected model's
scores on every instrument, the residual-stream states of every pair, the neutral text.

A split only chooses rows, so the uncorrected CrowS-Pairs scores of all rows serve every
split's calibration base and held-out "before"; BBQ and generation do not depend on the
split at all; and directions need only each pair's token-mean states, read once for the
whole suite through llama.cpp (edge.hidden) on the scoring weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bias.audit import score_bbq, score_pairs
from bias.feedback import Utility, neutral_chunks
from bias.judge import BBQFlags
from bias.repeat import RepeatConfig, sample_suite
from bias.scorer import BatchScorer
from bias.suites import Suite, load_suite
from edge.runtime import Runtime

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class PairStates:
    """Token-mean states per pair: h (n, n_layers, n_embd) per side, e (n, n_embd) embeddings."""

    h_more: np.ndarray
    h_less: np.ndarray
    e_more: np.ndarray
    e_less: np.ndarray

    def take(self, idx: np.ndarray | list[int]) -> PairStates:
        i = np.asarray(idx)
        return PairStates(self.h_more[i], self.h_less[i], self.e_more[i], self.e_less[i])


def pair_texts(rt: Runtime, suite: Suite) -> list[list[int]]:
    """BOS + tokens of each sentence, more then less per pair (as the scorer reads them)."""
    bos = rt.bos
    return [[bos, *rt.tokenize(s, add_bos=False)] for it in suite.items for s in (it.more, it.less)]


def read_states(rt: Runtime, suite: Suite, model_path: str, *, threads: int,
                rows: np.ndarray | None = None,
                on_progress: Callable[[int], None] | None = None) -> PairStates:
    """The pairs' states from llama.cpp (edge.hidden), embeddings from the GGUF itself.
    `rows`: only these pairs (the others stay zero: a split calibrates only on its rows)."""
    import gguf
    from gguf.quants import dequantize

    from edge.hidden import HiddenStates

    idx = np.arange(len(suite.items)) if rows is None else np.asarray(sorted(set(rows.tolist())))
    texts = pair_texts(rt, suite.subset(idx.tolist()))
    with HiddenStates(model_path, threads=threads) as hs:
        h = hs.token_means(texts, on_progress=on_progress)
    reader = gguf.GGUFReader(model_path)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    emb = dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
    e = np.array([emb[tk[1:]].mean(0) for tk in texts], np.float32)
    n = len(suite.items)
    full = [np.zeros((n, *a.shape[1:]), np.float32) for a in (h[0::2], h[1::2], e[0::2], e[1::2])]
    for f, a in zip(full, (h[0::2], h[1::2], e[0::2], e[1::2]), strict=True):
        f[idx] = a
    return PairStates(*full)


@dataclass
class Shared:
    suite: Suite
    base: tuple[np.ndarray, np.ndarray]  # uncorrected (ll_more, ll_less) of every row
    states: PairStates
    neutral: list[list[int]]
    utility: Utility  # its first call's distributions are the uncorrected model's
    base_ppl: float
    bbq: Suite | None = None
    bbq_base: np.ndarray | None = None  # (n_items, 3) answer log-likelihoods
    probes: Suite | None = None
    gen_base: list[dict[str, Any]] | None = None  # RepeatResult.items of the uncorrected model
    repeat: RepeatConfig | None = None

    @property
    def categories(self) -> np.ndarray:
        return np.array([it.category for it in self.suite.items])

    def bbq_flags(self, lls: np.ndarray) -> BBQFlags:
        assert self.bbq is not None
        return BBQFlags.from_scores(lls, self.bbq.items)


def bbq_sample(spec: str, per_condition: int, seed: int) -> Suite:
    """A fixed random sample of BBQ items: `per_condition` ambiguous and as many
    disambiguated, stratified by category file so every file a user points at is judged."""
    bbq = load_suite(spec)
    rng = np.random.default_rng(seed)
    cats = np.array([it.category for it in bbq.items])
    amb = np.array([it.ambiguous for it in bbq.items])
    keep: list[int] = []
    per_cat = max(1, per_condition // max(len(set(cats.tolist())), 1))
    for c in sorted(set(cats.tolist())):
        for cond in (True, False):
            idx = np.flatnonzero((cats == c) & (amb == cond))
            keep += rng.choice(idx, min(per_cat, len(idx)), replace=False).tolist()
    return bbq.subset(sorted(keep))


def compute_shared(rt: Runtime, scorer: BatchScorer, suite: Suite, *, states_model: str,
                   threads: int, bbq_spec: str | None, bbq_per_condition: int,
                   probes_spec: str | None, repeat: RepeatConfig | None, seed: int = 0,
                   state_rows: np.ndarray | None = None, on_event: Event | None = None) -> Shared:
    """Score the uncorrected model once on everything the splits will need."""
    emit = on_event or (lambda kind, data: None)
    emit("stage", {"stage": "uncorrected scores", "pairs": len(suite.items)})
    base = score_pairs(scorer, suite)
    emit("stage", {"stage": "pair states", "pairs": len(suite.items) if state_rows is None else len(state_rows)})
    states = read_states(rt, suite, states_model, threads=threads, rows=state_rows)
    neutral = neutral_chunks(rt)
    utility = Utility(scorer, neutral)
    base_ppl, _ = utility()
    sh = Shared(suite, base, states, neutral, utility, base_ppl)
    if bbq_spec:
        sh.bbq = bbq_sample(bbq_spec, bbq_per_condition, seed)
        emit("stage", {"stage": "uncorrected BBQ", "items": len(sh.bbq.items)})
        sh.bbq_base = score_bbq(scorer, sh.bbq)
    if probes_spec and repeat is not None:
        sh.probes, sh.repeat = load_suite(probes_spec), repeat
        emit("stage", {"stage": "uncorrected generation", "prompts": len(sh.probes.items)})
        sh.gen_base = sample_suite(rt, sh.probes, repeat).items
    return sh
