"""SVD cache: W = U S Vᵀ of every projection, computed once per model file and reused.

Stored as float16 factors truncated to the largest rank an allocation can ask for (half
the dense cost), beside the model when that folder is writable, else under EDGE_HOME.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.engine.model import Engine
from edge.engine.weights import LINEAR_NAMES
from edge.paths import atomic_write, cache_dir

# Largest share of a module's dense cost the low-rank term may take: r ≤ this·in·out/(in+out).
MAX_LOWRANK_SHARE = 0.5


def channel_norms(wt: np.ndarray) -> np.ndarray:
    """c_j = ‖W[:, j]‖: wt is Wᵀ (in, out), so one norm per row."""
    return np.sqrt(np.einsum("ij,ij->i", wt, wt, dtype=np.float64)).astype(np.float32)


def norms_for(engine: Engine) -> dict[tuple[int, str], np.ndarray]:
    """Channel norms of every projection, computed once per engine."""
    norms = getattr(engine, "_channel_norms", None)
    if norms is None:
        norms = {(il, n): channel_norms(lw.wt[n])
                 for il, lw in enumerate(engine.weights.layers) for n in LINEAR_NAMES}
        engine._channel_norms = norms  # type: ignore[attr-defined]
    return norms


def max_rank(n_in: int, n_out: int) -> int:
    return min(n_in, n_out, int(np.ceil(MAX_LOWRANK_SHARE * n_in * n_out / (n_in + n_out))))


def cache_path(engine: Engine) -> Path:
    return cache_path_for(engine.path, engine.info.fingerprint)


def cache_path_for(model: str | Path, fingerprint: str) -> Path:
    # in the cache folder, never beside the model: that may be site-packages (the bundled
    # model) or a read-only share, and a package manager would not remove it
    return cache_dir() / "svd" / f"{Path(model).stem}.{fingerprint[:12]}.svd.npz"


class SvdCache:
    def __init__(self, factors: dict[str, np.ndarray]) -> None:
        self._f = factors

    def factors(self, layer: int, name: str, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(V_r (in, r), S_r U_rᵀ (r, out)) as float32."""
        a = self._f[f"{layer}.{name}.a"]
        b = self._f[f"{layer}.{name}.b"]
        if r > a.shape[1]:
            raise ValueError(f"rank {r} exceeds the cached {a.shape[1]} for {layer}.{name}")
        return (np.ascontiguousarray(a[:, :r], dtype=np.float32),
                np.ascontiguousarray(b[:r], dtype=np.float32))

    @classmethod
    def load_or_build(cls, engine: Engine, progress: Callable[[int, int], None] | None = None,
                      path: Path | None = None) -> SvdCache:
        path = path or cache_path(engine)
        if path.is_file():
            with np.load(path) as z:
                return cls({k: z[k] for k in z.files})
        out: dict[str, np.ndarray] = {}
        layers = engine.weights.layers
        total = len(layers) * len(LINEAR_NAMES)
        for il, lw in enumerate(layers):
            for j, name in enumerate(LINEAR_NAMES):
                wt = lw.wt[name]  # Wᵀ = V S Uᵀ
                v, s, ut = np.linalg.svd(wt, full_matrices=False)
                r = max_rank(*wt.shape)
                out[f"{il}.{name}.a"] = v[:, :r].astype(np.float16)
                out[f"{il}.{name}.b"] = (s[:r, None] * ut[:r]).astype(np.float16)
                if progress:
                    progress(il * len(LINEAR_NAMES) + j + 1, total)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            np.savez(f, **out)
        return cls(out)
