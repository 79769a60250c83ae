"""The fused sparse decode kernel against dense BLAS on SmolLM2-shaped float32 matrices.

One decode step's projections (30 layers × q,k,v,o,gate,up,down; 424 MB, far beyond cache)
at 0/30/50/70% of input channels inactive, mask included, interleaved with the dense
numpy product in one run. Usage: python benchmarks/sparse_kernel.py [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np

    from edge.sparse.kernel import sparse_matvec
    from edge.sparse.svd import channel_norms

    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal(s).astype(np.float32) / 24 for _ in range(30) for s in shapes]
    norms = [channel_norms(w) for w in mats]
    xs = {n: rng.standard_normal(n).astype(np.float32) for n in (576, 1536)}
    levels = (0.0, 0.3, 0.5, 0.7)
    ts = {f: [float(np.quantile(np.abs(xs[w.shape[0]] * c), f)) if f else -1.0 for w, c in zip(mats, norms, strict=True)]
          for f in levels}

    def dense() -> None:
        for w in mats:
            _ = xs[w.shape[0]] @ w

    def sparse(f: float) -> None:
        for w, c, t in zip(mats, norms, ts[f], strict=True):
            sparse_matvec(xs[w.shape[0]], w, c, t, parallel=args.threads > 1)

    sparse(0.5)  # JIT
    res: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for name, fn in [("dense", dense)] + [(f"sparse {f:.0%}", lambda f=f: sparse(f)) for f in levels]:
            t = time.perf_counter()
            fn()
            res.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
    d = float(np.median(res["dense"]))
    print(f"dense numpy/BLAS: {d:.1f} ms per decode step's projections (threads {args.threads})")
    for f in levels:
        m = float(np.median(res[f"sparse {f:.0%}"]))
        print(f"fused kernel at {f:.0%} inactive: {m:.1f} ms ({d / m:.2f}× dense)")


if __name__ == "__main__":
    main()
