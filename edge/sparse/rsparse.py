"""R-Sparse linear layers: exact active channels plus a low-rank term for the rest.

For y = W x with Wᵀ stored (in, out), channel norms c_j = ‖W[:, j]‖ and SVD W = U S Vᵀ:
    m = |x ⊙ c| > t,   y = Wᵀ-rows(x ⊙ m) + ((x ⊙ (1−m)) V_r) (S_r U_rᵀ)
α = 1 (r = 0) is TEAL-style magnitude sparsity; s = 0 (t < 0) is the dense product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edge.engine.model import Engine


@dataclass
class ModuleSpec:
    """One projection's allocation. t < 0 keeps every channel (dense)."""

    layer: int
    name: str
    s: float  # sparsity: fraction of this module's weight reads skipped
    alpha: float  # share of the kept budget spent on exact channels (1 = TEAL)
    k: int  # expected active channels per token
    r: int  # rank of the low-rank term
    t: float  # threshold on |x ⊙ c|

    def to_dict(self) -> dict:
        return asdict(self)


def budget(n_in: int, n_out: int, s: float, alpha: float) -> tuple[int, int]:
    """(k, r): exact channels and rank that together cost (1 − s) of the dense product."""
    k = int(np.floor(n_in * (1.0 - s) * alpha))
    r = int(np.floor(max(0.0, n_in * n_out * (1.0 - s) - k * n_out) / (n_in + n_out)))
    return k, min(r, min(n_in, n_out))


def sparse_linear_numpy(x: np.ndarray, wt: np.ndarray, c: np.ndarray, t: float,
                        a: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
    """The reference formula for any number of rows; a = V_r (in, r), b = S_r U_rᵀ (r, out)."""
    m = np.abs(x * c) > t
    y = np.where(m, x, np.float32(0)) @ wt
    if a is not None and a.shape[1] > 0:
        y = y + (np.where(m, np.float32(0), x) @ a) @ b
    return y.astype(np.float32, copy=False)


@dataclass
class SparseModule:
    spec: ModuleSpec
    wt: np.ndarray
    c: np.ndarray
    a: np.ndarray | None  # (in, r)
    b: np.ndarray | None  # (r, out)

    def __call__(self, x: np.ndarray, use_kernel: bool) -> np.ndarray:
        if self.spec.t < 0:
            return x @ self.wt
        # numba is imported on the first single-token call only: loading a profile (e.g. for
        # the quantized C engine) must not pay its ~60 MB of RSS
        from edge.sparse.kernel import HAVE_NUMBA, sparse_matvec

        if use_kernel and x.shape[0] == 1 and HAVE_NUMBA:
            y, rest, _ = sparse_matvec(x[0], self.wt, self.c, self.spec.t, parallel=False)
            if self.a is not None and self.a.shape[1] > 0:
                y += (rest @ self.a) @ self.b
            return y[None, :]
        return sparse_linear_numpy(x, self.wt, self.c, self.spec.t, self.a, self.b)


class SparseBackend:
    """An engine backend that runs every projection with its ModuleSpec.

    Single-token calls (decode) go through the fused kernel; longer ones through the numpy
    formula, which is the same arithmetic (tests hold them equal).
    """

    def __init__(self, engine: Engine, specs: Sequence[ModuleSpec], svd: object | None = None,
                 use_kernel: bool = True) -> None:
        self.engine = engine
        self.use_kernel = use_kernel
        self.modules: dict[tuple[int, str], SparseModule] = {}
        from edge.sparse.svd import norms_for

        norms = norms_for(engine)
        for sp in specs:
            wt = engine.weights.layers[sp.layer].wt[sp.name]
            a = b = None
            if sp.r > 0:
                if svd is None:
                    raise ValueError("an allocation with rank > 0 needs the SVD cache")
                a, b = svd.factors(sp.layer, sp.name, sp.r)  # type: ignore[attr-defined]
            self.modules[(sp.layer, sp.name)] = SparseModule(sp, wt, norms[(sp.layer, sp.name)], a, b)

    def project(self, il: int, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        out = []
        for n in names:
            mod = self.modules.get((il, n))
            out.append(x @ self.engine.weights.layers[il].wt[n] if mod is None
                       else mod(x, self.use_kernel))
        return out
