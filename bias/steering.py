"""Per-layer steering directions from contrastive pairs, on the engine's residual stream.

For each pair, the numpy reference engine (edge.engine) gives hidden[il] — the residual
stream leaving layer il — for both sentences; their token-mean difference (more − less)
is one sample of "what the stereotype adds" at each layer. The direction is the mean of
those samples (or their first principal component, sign-aligned with the mean). Layer
statistics (how consistent the difference is, how large against the stream) feed the
feedback loop's per-layer allocation. Vectors are saved in llama.cpp's control-vector
format (edge.cvec), applied with llama_set_adapter_cvec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bias.suites import PairItem
from edge.cvec import ControlVector, load_correction, read, write

__all__ = ["ControlVector", "Directions", "compute_directions", "load_correction",
           "pair_states", "read", "write"]


@dataclass
class Directions:
    """Per-layer directions (n_layers, n_embd), row 0 unused, plus per-layer statistics."""

    vectors: np.ndarray  # mean (or PCA) of h(more) − h(less), per layer
    snr: np.ndarray  # (n_layers,) |mean diff| / spread of the per-pair diffs along it
    rel_norm: np.ndarray  # (n_layers,) |direction| / mean |h|: how big a push it is
    n_pairs: int
    method: str


def pair_states(engine: Any, items: Sequence[PairItem],
                on_progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token-mean residual stream per layer for each sentence: two (n, n_layers, n_embd)."""
    from threadpoolctl import threadpool_limits

    bos = engine._llama_vocab().token_bos() if hasattr(engine, "_llama_vocab") else 1
    out = []
    # a sentence is ~20 rows: BLAS threads only spin, and on a busy 2-core box they made
    # this 13x slower (131 s vs 9.6 s for 10 pairs)
    with threadpool_limits(1, user_api="blas"):
        for it in items:
            pair = []
            for text in (it.more, it.less):
                toks = [bos, *engine.tokenize(text, add_bos=False)]
                h = engine.forward(toks, return_hidden=True, last_only=True).hidden
                pair.append(h[:, 1:].mean(axis=1))  # skip BOS: the same state for every text
            out.append(pair)
            if on_progress:
                on_progress(1)
    arr = np.asarray(out, dtype=np.float32)
    return arr[:, 0], arr[:, 1]


def compute_directions(h_more: np.ndarray, h_less: np.ndarray, method: str = "mean") -> Directions:
    diff = (h_more - h_less).astype(np.float64)  # (n, L, d)
    mean = diff.mean(axis=0)
    if method == "pca":
        vecs = np.zeros_like(mean)
        for il in range(diff.shape[1]):
            # uncentred, as llama.cpp's cvector-generator: the top axis of the differences
            _, _, vt = np.linalg.svd(diff[:, il], full_matrices=False)
            pc = vt[0] * np.sign(vt[0] @ mean[il] or 1.0)
            vecs[il] = pc * (diff[:, il] @ pc).mean()  # scaled to the mean projection
    elif method == "mean":
        vecs = mean
    else:
        raise ValueError(f"unknown direction method {method!r}; use mean or pca")
    norms = np.linalg.norm(vecs, axis=1)
    unit = vecs / np.maximum(norms, 1e-12)[:, None]
    proj = np.einsum("nld,ld->nl", diff, unit)  # each pair's difference along the direction
    snr = np.abs(proj.mean(0)) / np.maximum(proj.std(0), 1e-12)
    scale = np.linalg.norm(np.concatenate([h_more, h_less]), axis=2).mean(0)
    vecs[0] = 0.0  # llama.cpp never applies a vector at layer 0
    return Directions(vecs.astype(np.float32), snr, norms / np.maximum(scale, 1e-12),
                      len(diff), method)
