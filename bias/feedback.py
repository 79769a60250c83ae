"""The layer-wise bias-correction feedback loop, judged on data it never saw.

1. Split the suite: seeded random, stratified by category (CrowS-Pairs is ordered, so
   contiguous blocks would differ in bias); an optional category is kept out entirely.
2. Directions from the calibration pairs (bias.steering, engine residual streams).
3. Per-layer coefficients c_l = g · w_l: w_l from the layer's measured consistency (SNR
   of the pair differences), the gain g from measurements — each iteration applies
   c × directions through llama_set_adapter_cvec, scores bias on the calibration part and
   PPL on neutral text, then moves g by a secant step toward zero mean log-likelihood
   difference, bisecting back whenever PPL rises past the budget. Every iteration is logged.
4. The chosen vector is evaluated before/after on the held-out part (paired bootstrap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bias import metrics as M
from bias.audit import score_pairs
from bias.scorer import BatchScorer
from bias.steering import Directions
from bias.suites import Suite
from edge.errors import BadOptionError

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class LoopConfig:
    target: float = 0.8  # fraction of |pct − 50| and of the mean ll difference to remove
    max_ppl_increase: float = 0.05
    max_iter: int = 8
    calib_frac: float = 0.3
    seed: int = 0
    exclude_category: str | None = None  # never used in the loop; checked on held-out
    first_gain: float = -0.1

    def validate(self) -> None:
        if not 0 < self.target <= 1:
            raise BadOptionError(f"--target {self.target} must be in (0, 1]")
        if not 0 < self.calib_frac < 1:
            raise BadOptionError(f"calibration fraction {self.calib_frac} must be in (0, 1)")
        if self.max_ppl_increase < 0:
            raise BadOptionError("--max-ppl-increase must be ≥ 0")


@dataclass
class Iteration:
    i: int
    gain: float
    pct_stereotype: float
    gap: float
    mean_ll_diff: float
    ppl: float
    ppl_increase: float
    feasible: bool


@dataclass
class LoopResult:
    coefficients: np.ndarray  # (n_layers,), row 0 zero
    gain: float
    iterations: list[Iteration] = field(default_factory=list)
    base_ppl: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": [float(c) for c in self.coefficients], "gain": self.gain,
                "base_ppl": self.base_ppl, "iterations": [asdict(it) for it in self.iterations]}


def split(suite: Suite, frac: float, seed: int, exclude: str | None = None) -> tuple[list[int], list[int]]:
    """(calibration, held-out) item indices: random within each category, never blocks."""
    rng = np.random.default_rng(seed)
    cal: list[int] = []
    held: list[int] = []
    cats = np.array([it.category for it in suite.items])
    for c in sorted(set(cats.tolist())):
        idx = np.flatnonzero(cats == c)
        if c == exclude:
            held += idx.tolist()
            continue
        idx = rng.permutation(idx)
        k = int(round(frac * len(idx)))
        cal += idx[:k].tolist()
        held += idx[k:].tolist()
    return sorted(cal), sorted(held)


def neutral_tokens(rt: Any, n_tokens: int = 256) -> list[int]:
    """Python documentation prose (pydoc_data, shipped with CPython): neutral text for PPL."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[: n_tokens * 8]
    return [rt.llm.token_bos(), *rt.tokenize(text, add_bos=False)[: n_tokens - 1]]


def perplexity(scorer: BatchScorer, tokens: list[int]) -> float:
    return float(np.exp(-scorer.score([(tokens, 1)])[0].mean()))


def layer_weights(d: Directions) -> np.ndarray:
    """w_l ∝ the layer's SNR (mean 1 over layers 1..L−1): consistent layers are pushed more."""
    w = d.snr.astype(np.float64).copy()
    w[0] = 0.0
    return w / max(w[1:].mean(), 1e-12)


def run_loop(scorer: BatchScorer, calib: Suite, d: Directions, cfg: LoopConfig,
             ppl_tokens: list[int], on_event: Event | None = None) -> LoopResult:
    cfg.validate()
    w = layer_weights(d)
    emit = on_event or (lambda kind, data: None)

    def measure(i: int, g: float) -> Iteration:
        scorer.set_control_vector(d.vectors * (g * w)[:, None] if g else None)
        more, less = score_pairs(scorer, calib)
        ppl = perplexity(scorer, ppl_tokens)
        it = Iteration(i, g, float(M.pct_stereotype(more, less)), float(M.stereotype_gap(more, less)),
                       float(M.mean_ll_diff(more, less)), ppl, 0.0, True)
        return it

    base = measure(0, 0.0)
    res = LoopResult(np.zeros_like(w), 0.0, [base], base.ppl)
    emit("iteration", asdict(base))
    keep = 1.0 - cfg.target

    def score(it: Iteration) -> float:  # how far from the target, relative to the baseline
        return max(it.gap / max(base.gap, 1e-9), abs(it.mean_ll_diff) / max(abs(base.mean_ll_diff), 1e-9))

    best, prev, g = base, base, cfg.first_gain
    feasible_g = 0.0
    for i in range(1, cfg.max_iter + 1):
        it = measure(i, g)
        it.ppl_increase = it.ppl / base.ppl - 1.0
        it.feasible = it.ppl_increase <= cfg.max_ppl_increase
        res.iterations.append(it)
        emit("iteration", asdict(it))
        if it.feasible and score(it) < score(best):
            best = it
        if it.feasible and score(it) <= keep:
            break
        if not it.feasible:
            g = (feasible_g + g) / 2  # the budget binds: back off toward the last safe gain
            continue
        feasible_g = g
        slope = (it.mean_ll_diff - prev.mean_ll_diff) / (it.gain - prev.gain)
        step = -it.mean_ll_diff / slope if slope else g
        step = float(np.clip(step, -2 * abs(g - prev.gain) - 0.05, 2 * abs(g - prev.gain) + 0.05))
        prev, g = it, g + step
    scorer.set_control_vector(None)
    res.gain = best.gain
    res.coefficients = best.gain * w
    return res
