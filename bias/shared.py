"""What every split of a mitigation run shares, computed once: the uncorrected model's
scores on every instrument, the residual-stream states of every pair, the neutral text.

A split only chooses rows, so the uncorrected CrowS-Pairs scores of all rows serve every
split's calibration base and held-out "before"; BBQ and generation do not depend on the
split at all; and directions need only each pair's token-mean states, read once for the
whole suite through llama.cpp (edge.hidden) on the scoring weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bias.audit import score_bbq, score_pair_parts
from bias.feedback import Utility, utility_chunks
from bias.judge import BBQFlags
from bias.metrics import PPL_TOKENS
from bias.repeat import RepeatConfig, sample_suite
from bias.scorer import BatchScorer
from bias.suites import Suite, load_suite
from edge.paths import atomic_path, atomic_write
from edge.runtime import Runtime

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class PairStates:
    """Token-mean states per pair: h (n, n_layers, n_embd) per side, e (n, n_embd) embeddings,
    o (n, n_embd) rows of the output head (None: the head is tied, o = e)."""

    h_more: np.ndarray
    h_less: np.ndarray
    e_more: np.ndarray
    e_less: np.ndarray
    o_more: np.ndarray | None = None
    o_less: np.ndarray | None = None

    def take(self, idx: np.ndarray | list[int]) -> PairStates:
        i = np.asarray(idx)
        o = (None, None) if self.o_more is None or self.o_less is None else (self.o_more[i], self.o_less[i])
        return PairStates(self.h_more[i], self.h_less[i], self.e_more[i], self.e_less[i], *o)

    @property
    def head(self) -> tuple[np.ndarray, np.ndarray]:
        if self.o_more is None or self.o_less is None:
            return self.e_more, self.e_less
        return self.o_more, self.o_less


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
    tensors = {t.name: t for t in reader.tensors}

    def token_means(name: str) -> np.ndarray:
        t = tensors[name]
        rows = dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
        return np.array([rows[tk[1:]].mean(0) for tk in texts], np.float32)

    e = token_means("token_embd.weight")
    parts = [h[0::2], h[1::2], e[0::2], e[1::2]]
    if "output.weight" in tensors:  # an untied head: its own rows (a tied one reads e)
        o = token_means("output.weight")
        parts += [o[0::2], o[1::2]]
    n = len(suite.items)
    full = [np.zeros((n, *a.shape[1:]), np.float32) for a in parts]
    for f, a in zip(full, parts, strict=True):
        f[idx] = a
    return PairStates(*full)


def read_shared_positions(rt: Runtime, suite: Suite, model_path: str, *, threads: int, rows: np.ndarray,
                          cache_dir: Path | None = None,
                          on_read: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair of `rows`, each layer's output averaged over the states that predict the
    tokens the two sentences share once they have differed (bias.audit.shared_after_rewrite:
    where the shared tokens' part of a pair's difference is read). (h_more, h_less, ok), all
    rows of the suite, zero outside `rows`; ok is False where nothing follows the rewrite.
    Kept in cache_dir/shared_positions.npz for a rerun with the same model and rows;
    `on_read` is called when they are read from the model (not found there)."""
    from bias.audit import _sentence, shared_after_rewrite
    from edge.hidden import HiddenStates

    idx = np.asarray(sorted(set(np.asarray(rows).tolist())), dtype=int)
    key = json.dumps({"model": model_path, "suite": suite.source, "rows": [suite.items[i].row for i in idx]})
    path = None if cache_dir is None else cache_dir / "shared_positions.npz"
    try:
        if path is not None:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return z["h_more"], z["h_less"], z["ok"]
    except (OSError, ValueError, KeyError):  # absent or partial: read them again
        pass
    if on_read is not None:
        on_read()
    texts, pos = [], []
    for i in idx:
        it = suite.items[i]
        a, b = _sentence(rt, it.more)[0], _sentence(rt, it.less)[0]
        aligned = shared_after_rewrite(a, b)
        texts += [a, b]
        pos += [[p for p, _ in aligned], [q for _, q in aligned]]
    with HiddenStates(model_path, threads=threads) as hs:
        h = hs.position_means(texts, pos)
    n = len(suite.items)
    full = [np.zeros((n, *h.shape[1:]), np.float32) for _ in range(2)]
    full[0][idx], full[1][idx] = h[0::2], h[1::2]
    ok = np.zeros(n, bool)
    ok[idx] = [len(p) > 0 for p in pos[0::2]]
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, h_more=full[0], h_less=full[1], ok=ok, key=np.array(key))
    return full[0], full[1], ok


@dataclass
class Shared:
    suite: Suite
    base: tuple[np.ndarray, np.ndarray]  # uncorrected (ll_more, ll_less) of every row
    states: PairStates | None  # None: no method of the run reads them (learn alone)
    neutral: list[list[int]]
    utility: Utility  # its first call's distributions are the uncorrected model's
    base_ppl: float
    bbq: Suite | None = None
    bbq_base: np.ndarray | None = None  # (n_items, 3) answer log-likelihoods
    probes: Suite | None = None
    gen_base: list[dict[str, Any]] | None = None  # RepeatResult.items of the uncorrected model
    base_words: np.ndarray | None = None  # each row's ll difference over its rewritten words (PairScores)
    repeat: RepeatConfig | None = None

    def states_of(self, rows: np.ndarray) -> PairStates:
        if self.states is None:
            raise RuntimeError("this run read no pair states: pass compute_shared the rows that need them")
        return self.states.take(rows)

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
                   state_rows: np.ndarray | None = None, score_rows: np.ndarray | None = None,
                   on_event: Event | None = None, cache_dir: Path | None = None, bbq_scored: bool = True,
                   ppl_tokens: int = PPL_TOKENS) -> Shared:
    """Score the uncorrected model once on everything the splits will need. With
    `cache_dir`, what was computed is kept there (shared.npz, shared.json) and reused by a
    rerun with the same model, suite and settings: a run stopped or crashed after the
    shared work restarts at its splits. An empty `state_rows` reads no pair states (3 minutes
    on the bundled model that `learn` does not need), and any cache with them serves it.
    `bbq_scored` False samples the BBQ items but scores none (a run that judges BBQ in its
    own engine). `ppl_tokens`: the utility's neutral text (bias.feedback.utility_chunks)."""
    emit = on_event or (lambda kind, data: None)
    key = {"model": str(rt.path), "states_model": states_model, "suite": suite.source,
           "rows": [it.row for it in suite.items],
           "probes": probes_spec, "repeat": None if repeat is None else asdict(repeat), "seed": seed,
           "state_rows": None if state_rows is None else sorted(int(i) for i in state_rows),
           "score_rows": None if score_rows is None else sorted(int(i) for i in score_rows)}
    neutral = utility_chunks(rt, ppl_tokens)
    utility = Utility(scorer, neutral)
    base_ppl, _ = utility()  # also fixes the uncorrected distributions the KL compares with
    # BBQ has its own key: asking for more BBQ items rescores BBQ alone
    bbq_key = {"bbq": bbq_spec, "bbq_per_condition": bbq_per_condition, "seed": seed}
    need_states = state_rows is None or len(state_rows) > 0
    ignore = () if need_states else ("states_model", "state_rows")
    cached = _load_cache(cache_dir, key, ignore) if cache_dir else None
    if cached is not None:
        emit("stage", {"stage": "shared work from cache", "path": str(cache_dir)})
        sh = Shared(suite, cached["base"], cached["states"] if need_states else None, neutral, utility, base_ppl)
        sh.base_words = cached["words"]
        stale = sh.base_words is None  # a cache from before the words part was kept
        if stale:
            sh.base_words = _base_scores(scorer, suite, score_rows, emit)[2]
        if probes_spec and repeat is not None:
            sh.probes, sh.repeat, sh.gen_base = load_suite(probes_spec), repeat, cached["gen_base"]
        if bbq_spec:
            sh.bbq = bbq_sample(bbq_spec, bbq_per_condition, seed)
            if cached["bbq_key"] == bbq_key and cached["bbq_base"] is not None:
                sh.bbq_base = cached["bbq_base"]
            elif bbq_scored:
                emit("stage", {"stage": "uncorrected BBQ", "items": len(sh.bbq.items)})
                sh.bbq_base = score_bbq(scorer, sh.bbq)
                stale = True
        if stale and cache_dir:
            _save_cache(cache_dir, key, bbq_key, sh)
        return sh
    *base, words = _base_scores(scorer, suite, score_rows, emit)
    states = None
    if need_states:
        emit("stage", {"stage": "pair states", "pairs": len(suite.items) if state_rows is None else len(state_rows)})
        states = read_states(rt, suite, states_model, threads=threads, rows=state_rows)
    sh = Shared(suite, (base[0], base[1]), states, neutral, utility, base_ppl, base_words=words)
    if bbq_spec:
        sh.bbq = bbq_sample(bbq_spec, bbq_per_condition, seed)
        if bbq_scored:
            emit("stage", {"stage": "uncorrected BBQ", "items": len(sh.bbq.items)})
            sh.bbq_base = score_bbq(scorer, sh.bbq)
    if probes_spec and repeat is not None:
        sh.probes, sh.repeat = load_suite(probes_spec), repeat
        emit("stage", {"stage": "uncorrected generation", "prompts": len(sh.probes.items)})
        sh.gen_base = sample_suite(rt, sh.probes, repeat).items
    if cache_dir:
        _save_cache(cache_dir, key, bbq_key, sh)
    return sh


def _base_scores(scorer: BatchScorer, suite: Suite, rows: np.ndarray | None,
                 emit: Event) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The uncorrected (more, less, words part) of `rows` (NaN elsewhere: no split reads them)."""
    idx = np.arange(len(suite.items)) if rows is None else np.asarray(rows, dtype=int)
    emit("stage", {"stage": "uncorrected scores", "pairs": len(idx)})
    s = score_pair_parts(scorer, suite.subset(idx.tolist()))
    out = tuple(np.full(len(suite.items), np.nan) for _ in range(3))
    for o, x in zip(out, (s.more, s.less, s.words), strict=True):
        o[idx] = x
    return out


def _save_cache(d: Path, key: dict[str, Any], bbq_key: dict[str, Any], sh: Shared) -> None:
    st = sh.states
    arrays = {"more": sh.base[0], "less": sh.base[1]}
    if st is not None:
        arrays |= {"h_more": st.h_more, "h_less": st.h_less, "e_more": st.e_more, "e_less": st.e_less}
    if st is not None and st.o_more is not None and st.o_less is not None:
        arrays |= {"o_more": st.o_more, "o_less": st.o_less}
    if sh.bbq_base is not None:
        arrays["bbq_base"] = sh.bbq_base
    if sh.base_words is not None:
        arrays["words"] = sh.base_words
    with atomic_path(d / "shared.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    with atomic_write(d / "shared.json", "w") as f:
        json.dump({"key": key, "bbq_key": bbq_key, "gen_base": sh.gen_base}, f)


def _load_cache(d: Path, key: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The cache in d if its key matches `key` but for the fields `ignore` names."""
    try:
        meta = json.loads((d / "shared.json").read_text())
        if {k: v for k, v in meta["key"].items() if k not in ignore} != {k: v for k, v in key.items() if k not in ignore}:
            return None
        with np.load(d / "shared.npz") as z:
            states = None if ignore or "h_more" not in z.files else PairStates(
                z["h_more"], z["h_less"], z["e_more"], z["e_less"],
                *((z["o_more"], z["o_less"]) if "o_more" in z.files else ()))
            if states is None and not ignore:  # written by a run that needed no states
                return None
            return {"base": (z["more"], z["less"]), "states": states,
                    "bbq_base": z["bbq_base"] if "bbq_base" in z.files else None, "bbq_key": meta.get("bbq_key"),
                    "words": z["words"] if "words" in z.files else None,
                    "gen_base": meta["gen_base"]}
    except (OSError, ValueError, KeyError):  # absent, partial or from an older version: recompute
        return None
