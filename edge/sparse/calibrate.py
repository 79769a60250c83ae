"""Calibration: per-module activation statistics from one dense pass over a text.

For every projection it keeps a sample of |x ⊙ c| (the R-Sparse mask score) so thresholds
for any kept fraction are quantiles, and the per-channel Σx² that llama.cpp's importance
matrix holds, so the same pass can write an imatrix for `edge quantize --imatrix`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.engine.model import Engine
from edge.errors import SparseProfileError
from edge.sparse.svd import norms_for

MIN_TOKENS = 64
ROWS_KEPT = 192  # token rows sampled per module and chunk for the |x ⊙ c| distribution


@dataclass
class Calibration:
    text_sha256: str
    tokens: list[int]
    chunk: int
    scores: dict[tuple[int, str], np.ndarray] = field(repr=False)  # sorted |x ⊙ c| samples
    sum_sq: dict[tuple[int, str], np.ndarray] = field(repr=False)  # Σ x² per input channel
    n_rows: int = 0

    def threshold(self, layer: int, name: str, keep: float) -> float:
        """t such that a fraction `keep` of channels has |x ⊙ c| > t; −1 keeps all."""
        if keep >= 1.0:
            return -1.0
        sc = self.scores[(layer, name)]
        if keep <= 0:
            return float(sc[-1]) * 2 + 1.0
        pos = (1.0 - keep) * (sc.size - 1)  # the samples are sorted: interpolate, no re-sort
        i = int(pos)
        j = min(i + 1, sc.size - 1)
        return float(sc[i] + (sc[j] - sc[i]) * (pos - i))


class _Recorder:
    """A dense backend that also records each projection's input statistics."""

    def __init__(self, engine: Engine, rng: np.random.Generator) -> None:
        self.engine = engine
        self.rng = rng
        self.c = norms_for(engine)
        self.samples: dict[tuple[int, str], list[np.ndarray]] = {k: [] for k in self.c}
        self.sum_sq: dict[tuple[int, str], np.ndarray] = {}
        self.rows = 0

    def project(self, il: int, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        pick = self.rng.choice(x.shape[0], size=min(ROWS_KEPT, x.shape[0]), replace=False)
        sq = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        out = []
        for n in names:
            key = (il, n)
            self.samples[key].append(np.abs(x[pick] * self.c[key]).ravel())
            self.sum_sq[key] = self.sum_sq.get(key, 0) + sq
            out.append(x @ self.engine.weights.layers[il].wt[n])
        return out


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibrate(engine: Engine, text: str, *, chunk: int = 256, max_tokens: int = 1024,
              seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Calibration:
    """One dense pass over `text` in chunks of `chunk` tokens (at most `max_tokens`)."""
    tokens = engine.tokenize(text)[:max_tokens]
    if len(tokens) < MIN_TOKENS:
        raise SparseProfileError(
            f"the calibration text is {len(tokens)} tokens; give at least {MIN_TOKENS} "
            "(a few pages of ordinary prose, e.g. 2,000+ words)")
    rec = _Recorder(engine, np.random.default_rng(seed))
    starts = list(range(0, len(tokens), chunk))
    for i, s in enumerate(starts):
        piece = tokens[s : s + chunk]
        if len(piece) < 2:
            continue
        engine.forward(piece, backend=rec, last_only=True)
        rec.rows += len(piece)
        if progress:
            progress(i + 1, len(starts))
    scores = {k: np.sort(np.concatenate(v)) for k, v in rec.samples.items()}
    return Calibration(text_sha256=text_sha256(text), tokens=list(tokens), chunk=chunk,
                       scores=scores, sum_sq=rec.sum_sq, n_rows=rec.rows)


def write_imatrix(cal: Calibration, engine: Engine, path: str | os.PathLike[str],
                  dataset: str = "") -> None:
    """The calibration's Σx² as llama.cpp's GGUF importance matrix (edge.imatrix's writer)."""
    from edge.engine.weights import _tensor_keys
    from edge.imatrix.files import Imatrix
    from edge.imatrix.files import write_imatrix as write

    keys = _tensor_keys()
    sums = {keys[n].format(bid=il) + ".weight": np.asarray(sq, dtype=np.float32) for (il, n), sq in cal.sum_sq.items()}
    write(Imatrix(sums, dict.fromkeys(sums, cal.n_rows), [dataset or cal.text_sha256],
                  max(1, cal.n_rows // cal.chunk), cal.chunk), path)
