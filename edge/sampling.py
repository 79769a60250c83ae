"""The one sampler: options, and llama.cpp's sampler chain in numpy, in small tested pieces.

Every caller samples the same way: the llama.cpp session (edge run/chat/serve), the native
engine (--sparse-profile) and the batched sampler (edge bias audit --repeat) take logits
from their engine and draw here. The chain is llama-cpp-python's for `Llama.generate`
(its `_init_sampler`): repeat penalty over the last 64 generated tokens → top_k →
(typical, off at 1.0) → top_p → min_p → temperature → draw; greedy (temp 0) applies the
penalty, then argmax. tests/test_sampling.py holds its kept tokens and probabilities equal
to llama.cpp's own C chain on random logits. The draw uses a numpy Generator per sequence
(seeded from --seed), so a seeded run repeats exactly whichever engine made the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import BadOptionError

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size default


@dataclass
class Sampling:
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None

    def validate(self) -> None:
        checks = [
            (self.temp >= 0, f"--temp {self.temp} must be ≥ 0 (0 = greedy)"),
            (0 < self.top_p <= 1, f"--top-p {self.top_p} must be in (0, 1]"),
            (self.top_k >= 0, f"--top-k {self.top_k} must be ≥ 0 (0 = off)"),
            (0 <= self.min_p <= 1, f"--min-p {self.min_p} must be in [0, 1]"),
            (self.repeat_penalty > 0, f"--repeat-penalty {self.repeat_penalty} must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BadOptionError(msg)

    def rng(self) -> np.random.Generator | None:
        """The draw's generator: None for greedy; seeded when --seed was given."""
        return None if self.temp <= 0 else np.random.default_rng(self.seed)


def penalize(x: np.ndarray, recent: Sequence[int], penalty: float) -> None:
    """llama.cpp's repeat penalty, in place: each token seen once or more is divided by the
    penalty if its logit is positive, multiplied if not (once, whatever its count)."""
    if penalty == 1.0 or not len(recent):
        return
    ids = np.unique(np.asarray(recent[-PENALTY_LAST_N:], dtype=np.int64))
    v = x[ids]
    x[ids] = np.where(v <= 0, v * np.float32(penalty), v / np.float32(penalty))


def chain(vals: np.ndarray, s: Sampling) -> np.ndarray:
    """top_p → min_p → temperature on candidates sorted best first; their probabilities.

    As llama.cpp: top_p keeps the shortest head whose softmax mass (float32) reaches p;
    min_p keeps logits ≥ the best + log(min_p); both keep at least one token.
    """
    vals = np.asarray(vals, dtype=np.float32)
    if s.top_p < 1.0 and len(vals) > 1:
        p = np.exp(vals - vals[0])
        p /= p.sum(dtype=np.float32)
        hit = np.flatnonzero(np.cumsum(p, dtype=np.float32) >= np.float32(s.top_p))
        vals = vals[: hit[0] + 1] if hit.size else vals
    if s.min_p > 0.0 and len(vals) > 1:
        floor = vals[0] + np.float32(np.log(np.float32(s.min_p)))
        vals = vals[: 1 + int((vals[1:] >= floor).sum())]
    vals = vals / np.float32(s.temp)
    p = np.exp(vals - vals[0]).astype(np.float64)
    return p / p.sum()


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Token ids of the k largest logits of each row (all if k ≤ 0), best first."""
    n = x.shape[-1]
    if 0 < k < n:
        idx = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    else:
        idx = np.broadcast_to(np.arange(n), x.shape).copy()
    order = np.argsort(-np.take_along_axis(x, idx, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(idx, order, axis=-1)


def candidates(logits: np.ndarray, s: Sampling, recent: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The tokens one row's chain keeps, best first, and their sampling probabilities."""
    x = np.array(logits, dtype=np.float32)
    penalize(x, recent, s.repeat_penalty)
    ids = top_k(x, s.top_k)
    return ids[: len(p := chain(x[ids], s))], p


def sample_rows(logits: np.ndarray, recents: Sequence[Sequence[int]],
                rngs: Sequence[np.random.Generator | None], s: Sampling) -> np.ndarray:
    """One token per row of `logits` (n, vocab); a row whose rng is None is greedy."""
    x = np.array(logits, dtype=np.float32)
    for r, recent in enumerate(recents):
        penalize(x[r], recent, s.repeat_penalty)
    out = x.argmax(axis=1)  # the greedy rows' tokens; drawn rows are overwritten below
    drawn = [r for r, g in enumerate(rngs) if g is not None and s.temp > 0]
    if drawn:
        ids = top_k(x[drawn], s.top_k)
        for j, r in enumerate(drawn):
            p = chain(x[r, ids[j]], s)
            # llama.cpp's dist: the first token whose running mass reaches u × total
            c = np.cumsum(p)
            pick = int(np.searchsorted(c, c[-1] * rngs[r].random(), side="left"))  # type: ignore[union-attr]
            out[r] = ids[j, min(pick, len(p) - 1)]
    return out


def sample(logits: np.ndarray, s: Sampling, recent: Sequence[int],
           rng: np.random.Generator | None) -> int:
    """One token from one row of logits: the chain above, greedy when rng is None."""
    return int(sample_rows(np.asarray(logits)[None, :], [recent], [rng], s)[0])
