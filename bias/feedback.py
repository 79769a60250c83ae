"""The layer-wise bias-correction feedback loop, judged on data it never saw.

1. Split the suite: seeded random, stratified by category (CrowS-Pairs is ordered, so
   contiguous blocks would differ in bias); an optional category is kept out entirely.
2. Directions from the calibration pairs (bias.steering, engine residual streams).
3. Per-layer coefficients from measurements. Probe: push each block of layers alone
   (c = −push · snr_l on the block) and measure the fall of the calibration mean
   log-likelihood difference (linear in c) and the PPL rise on neutral text (quadratic:
   zero slope at c = 0). Minimising Σ cost_b c_b² subject to Σ drop_b c_b = the bias to
   remove gives c_b ∝ drop_b / cost_b: blocks that move bias cheaply get the push, blocks
   that only hurt fluency get none. Then c_l = g · w_l and each iteration applies
   c × directions through llama_set_adapter_cvec, scores bias on the calibration part and
   PPL (and KL) on neutral text, and moves g by a secant step toward zero mean
   log-likelihood difference, never past the gain that the measured (quadratic) PPL rise
   allows; past the budget it steps back to the gain that would use 95% of it. Every
   measurement — probes included — is logged.
4. The chosen vector is evaluated before/after on the held-out part (paired bootstrap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bias import metrics as M
from bias.audit import score_pairs
from bias.metrics import MIN_PPL_TOKENS, PPL_TOKENS
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
    first_gain: float = -0.1  # used when the probes predict nothing (e.g. no block helps)
    n_blocks: int = 6  # layer blocks probed for the per-layer allocation; 0: SNR weights only
    probe_push: float = 0.6
    ppl_tokens: int = PPL_TOKENS  # the utility's neutral text (utility_chunks)

    def validate(self) -> None:
        if not 0 < self.target <= 1:
            raise BadOptionError(f"--target {self.target} must be in (0, 1]")
        if not 0 < self.calib_frac < 1:
            raise BadOptionError(f"calibration fraction {self.calib_frac} must be in (0, 1)")
        if self.max_ppl_increase < 0:
            raise BadOptionError("--max-ppl-increase must be ≥ 0")
        check_ppl_tokens(self.ppl_tokens)


@dataclass
class Iteration:
    i: int
    phase: str  # "base", "probe L3-L7", "gain"
    gain: float
    pct_stereotype: float
    gap: float
    mean_ll_diff: float
    ppl: float
    ppl_increase: float
    feasible: bool
    kl: float = 0.0  # mean KL(uncorrected ‖ corrected) per token of the neutral text


@dataclass
class BlockProbe:
    first: int  # layers first..last (inclusive) pushed alone
    last: int
    drop: float  # fall of the mean ll difference per unit push
    cost: float  # relative PPL rise per unit push, squared


# What a run says when the loop kept no step (LoopResult.kept is false)
NOTHING_KEPT = "no gain lowered the calibration bias within the PPL budget"


@dataclass
class LoopResult:
    coefficients: np.ndarray  # (n_layers,), row 0 zero
    gain: float
    iterations: list[Iteration] = field(default_factory=list)
    base_ppl: float = 0.0
    weights: np.ndarray | None = None  # the per-layer allocation w (mean 1 over layers ≥ 1)
    probes: list[BlockProbe] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        """Whether the loop kept a step: when no gain lowered the calibration bias within the
        budget, its best is the uncorrected model (every coefficient 0), which no file should carry."""
        return bool(np.any(self.coefficients))

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": [float(c) for c in self.coefficients], "gain": self.gain,
                "base_ppl": self.base_ppl, "iterations": [asdict(it) for it in self.iterations],
                "weights": None if self.weights is None else [float(x) for x in self.weights],
                "probes": [asdict(p) for p in self.probes]}


def calib_count(frac: float, n: int) -> int:
    """How many of a category's n pairs split() puts in calibration."""
    return int(round(frac * n))


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
        k = calib_count(frac, len(idx))
        cal += idx[:k].tolist()
        held += idx[k:].tolist()
    return sorted(cal), sorted(held)


CHARS_PER_TOKEN = 8  # generous: pydoc prose runs ~4 characters a token


def pydoc_text() -> str:
    """Python's documentation prose (pydoc_data, shipped with CPython): the neutral text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def neutral_chars(n_chunks: int = 4, n_tokens: int = 512) -> int:
    """How much of pydoc_text() neutral_chunks reads: text past it is unseen by the utility."""
    return n_chunks * n_tokens * CHARS_PER_TOKEN


def neutral_chunks(rt: Any, n_chunks: int = 4, n_tokens: int = 512, start: int = 0) -> list[list[int]]:
    """Neutral text for the utility, as BOS + (n_tokens − 1)-token chunks. Several chunks,
    because llama.cpp's 8-bit activations make PPL of one chunk jump by ~0.3% between
    nearly equal vectors. `start`: the characters of pydoc_text() skipped first (past
    neutral_chars(): text the utility does not read)."""
    text = pydoc_text()[start: start + neutral_chars(n_chunks, n_tokens)]
    ids = rt.tokenize(text, add_bos=False)
    n = n_tokens - 1
    return [[rt.llm.token_bos(), *ids[i * n : (i + 1) * n]] for i in range(n_chunks) if len(ids) >= (i + 1) * n]


def check_ppl_tokens(tokens: int) -> None:
    if not MIN_PPL_TOKENS <= tokens <= PPL_TOKENS:
        raise BadOptionError(f"--ppl-tokens {tokens}: use {MIN_PPL_TOKENS} to {PPL_TOKENS}")


def utility_chunks(rt: Any, tokens: int = PPL_TOKENS) -> list[list[int]]:
    """The utility's neutral text: `tokens` tokens in equal chunks of at most 512."""
    check_ppl_tokens(tokens)
    n = -(-tokens // 512)
    return neutral_chunks(rt, n, -(-tokens // n))


class Utility:
    """PPL of neutral text and the mean KL(uncorrected ‖ corrected) of its next-token
    distributions: KL sees changes that the text's own tokens do not."""

    def __init__(self, scorer: BatchScorer, chunks: list[list[int]]):
        self.scorer, self.chunks = scorer, chunks
        self.base: list[np.ndarray] | None = None  # the first call's distributions
        self.base_ppl: float | None = None

    BLOCK = 16  # rows per step: 16 × a 49k vocabulary is 3 MB of float32

    def __call__(self) -> tuple[float, float]:
        first = self.base is None
        nll, kl, n = 0.0, 0.0, 0
        lps = []
        for i, toks in enumerate(self.chunks):
            logits = self.scorer.next_logits(toks)
            tgt = np.asarray(toks[1:])
            lp_all = np.empty(logits.shape, np.float32) if first else None
            # float32, in cache-sized row blocks: the float64 whole-chunk version spent more time
            # in numpy (and page faults on fresh 100 MB arrays) than llama.cpp spent decoding
            for a in range(0, len(logits), self.BLOCK):
                rows = logits[a : a + self.BLOCK]
                x = rows - rows.max(axis=1, keepdims=True)
                x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
                nll -= float(x[np.arange(len(x)), tgt[a : a + self.BLOCK]].sum(dtype=np.float64))
                if lp_all is not None:
                    lp_all[a : a + len(x)] = x
                else:
                    b = self.base[i][a : a + self.BLOCK]  # type: ignore[index]
                    kl += float(np.einsum("ij,ij->i", np.exp(b), b - x).sum(dtype=np.float64))
            lps.append(lp_all)
            n += len(logits)
        ppl = float(np.exp(nll / n))
        if first:
            self.base, self.base_ppl = lps, ppl  # type: ignore[assignment]
        return ppl, kl / n


def _base_ppl(u: Utility) -> float:
    if u.base_ppl is None:
        raise ValueError("the loop's base Utility must have measured the uncorrected model")
    return u.base_ppl


def layer_weights(d: Directions) -> np.ndarray:
    """w_l ∝ the layer's SNR (mean 1 over layers 1..L−1): consistent layers are pushed more."""
    w = d.snr.astype(np.float64).copy()
    w[0] = 0.0
    return w / max(w[1:].mean(), 1e-12)


def blocks(n_layers: int, n_blocks: int) -> list[tuple[int, int]]:
    """Layers 1..n_layers−1 in n_blocks contiguous runs of near-equal length."""
    edges = np.linspace(1, n_layers, min(n_blocks, n_layers - 1) + 1).round().astype(int)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def allocate(w: np.ndarray, probes: list[BlockProbe]) -> np.ndarray | None:
    """Per block, the multiplier k_b ∝ drop_b / cost_b of the probed weights w (so the
    allocation w·k has mean 1 over layers ≥ 1); None if no block lowers the bias."""
    costs = np.array([p.cost for p in probes])
    floor = max(float(np.median(costs)) * 0.1, 1e-4)  # a block with no measurable cost is not free
    k = np.array([max(p.drop, 0.0) / max(p.cost, floor) for p in probes])
    per_layer = np.zeros_like(w)
    for p, kb in zip(probes, k, strict=True):
        per_layer[p.first : p.last + 1] = w[p.first : p.last + 1] * kb
    if not per_layer[1:].any():
        return None
    return k / per_layer[1:].mean()


def _probe_blocks(measure: Callable[[str, float, np.ndarray], Iteration], base: Iteration,
                  w: np.ndarray, cfg: LoopConfig, probes: list[BlockProbe]) -> float:
    """Push each block of layers alone; reweight `w` in place by the measured bias fall per
    PPL cost; return the first gain (cfg.first_gain when the probes do not allow one)."""
    for a, b in blocks(len(w), cfg.n_blocks):
        mask = np.zeros_like(w)
        mask[a : b + 1] = 1.0
        it = measure(f"probe L{a}-L{b}", -cfg.probe_push, -cfg.probe_push * w * mask)
        probes.append(BlockProbe(a, b, (base.mean_ll_diff - it.mean_ll_diff) / cfg.probe_push,
                                 max(it.ppl_increase, 0.0) / cfg.probe_push ** 2))
    k = allocate(w, probes)
    if k is None:
        return cfg.first_gain
    for p, kb in zip(probes, k, strict=True):
        w[p.first : p.last + 1] *= kb
    # the linear (bias) / quadratic (PPL) model's gain for the whole fall, capped at the PPL
    # budget; the loop's secant steps correct what the model misses
    drop = float(sum(p.drop * kb for p, kb in zip(probes, k, strict=True)))
    cost = float(sum(p.cost * kb**2 for p, kb in zip(probes, k, strict=True)))
    if drop > 0 and base.mean_ll_diff > 0:
        g_bias = base.mean_ll_diff / drop
        g_ppl = float(np.sqrt(cfg.max_ppl_increase / cost)) if cost > 0 else g_bias
        return -min(g_bias, g_ppl)
    return cfg.first_gain


def run_loop(scorer: BatchScorer, calib: Suite, d: Directions, cfg: LoopConfig,
             neutral: list[list[int]], on_event: Event | None = None, *,
             base: tuple[np.ndarray, np.ndarray, Utility] | None = None) -> LoopResult:
    """`base`: the uncorrected (ll_more, ll_less) of `calib` and a Utility whose first call
    was the uncorrected model on `neutral`, when the caller has them (the split runner
    does): the loop then starts from them instead of scoring the uncorrected model again."""
    cfg.validate()
    w = layer_weights(d)
    emit = on_event or (lambda kind, data: None)
    log: list[Iteration] = []
    utility = base[2] if base is not None else Utility(scorer, neutral)

    def measure(phase: str, g: float, coef: np.ndarray) -> Iteration:
        if base is not None and not coef.any():
            more, less = base[0], base[1]
            ppl, kl = _base_ppl(utility), 0.0
        else:
            scorer.set_control_vector(d.vectors * coef[:, None] if coef.any() else None)
            more, less = score_pairs(scorer, calib)
            ppl, kl = utility()
        it = Iteration(len(log), phase, g, float(M.pct_stereotype(more, less)),
                       float(M.stereotype_gap(more, less)), float(M.mean_ll_diff(more, less)), ppl,
                       ppl / log[0].ppl - 1.0 if log else 0.0, True, kl)
        it.feasible = it.ppl_increase <= cfg.max_ppl_increase
        log.append(it)
        emit("iteration", asdict(it))
        return it

    b0 = measure("base", 0.0, np.zeros_like(w))
    res = LoopResult(np.zeros_like(w), 0.0, log, b0.ppl)
    g = _probe_blocks(measure, b0, w, cfg, res.probes) if cfg.n_blocks else cfg.first_gain
    keep = 1.0 - cfg.target

    def score(it: Iteration) -> float:  # how far from the target, relative to the baseline
        return max(it.gap / max(b0.gap, 1e-9), abs(it.mean_ll_diff) / max(abs(b0.mean_ll_diff), 1e-9))

    best, prev = b0, b0
    safe_g, unsafe_g = 0.0, None  # largest gain within the PPL budget, smallest beyond it

    def inside_budget(it: Iteration) -> float:
        # PPL rise ~ quadratic in the gain: the gain that would use 95% of the budget
        return it.gain * float(np.sqrt(0.95 * cfg.max_ppl_increase / max(it.ppl_increase, 1e-12)))

    for _ in range(cfg.max_iter):
        it = measure("gain", g, g * w)
        if it.feasible and score(it) < score(best):
            best = it
        if it.feasible and score(it) <= keep:
            break
        if not it.feasible:
            unsafe_g = g
            g_q = inside_budget(it)
            g = g_q if abs(safe_g) < abs(g_q) < abs(g) else (safe_g + g) / 2
            continue
        safe_g = g
        slope = (it.mean_ll_diff - prev.mean_ll_diff) / (it.gain - prev.gain)
        step = -it.mean_ll_diff / slope if slope else g
        step = float(np.clip(step, -2 * abs(g - prev.gain) - 0.05, 2 * abs(g - prev.gain) + 0.05))
        g_next = g + step
        if it.ppl_increase > 0 and abs(g_next) > abs(inside_budget(it)):
            g_next = inside_budget(it)  # the budget binds before the bias target
        if unsafe_g is not None and abs(g_next) >= abs(unsafe_g):
            g_next = (g + unsafe_g) / 2
        if abs(g_next - g) < 0.01 * abs(g):
            break  # at the budget's edge: the target is out of reach with these directions
        prev, g = it, g_next
    scorer.set_control_vector(None)
    res.gain = best.gain
    res.coefficients = best.gain * w
    res.weights = w
    return res

