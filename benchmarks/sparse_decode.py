"""Native decode speed, dense vs sparse profiles, interleaved round by round in one run.

Usage: python benchmarks/sparse_decode.py PROFILE [PROFILE ...] [--rounds 5] [--tokens 32] [--threads 1]
Each round decodes --tokens tokens dense, then with each profile; the speedup is the
median over rounds of dense ms / sparse ms (both paths use the same thread count).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np

    from edge.engine.generate import NativeGenerator
    from edge.sparse.profile import SparseProfile
    from edge.sparse.rsparse import SparseBackend
    from edge.sparse.svd import SvdCache

    engine = NativeGenerator.load(None).model
    backends = {}
    for p in args.profiles:
        prof = SparseProfile.load(p, engine)
        svd = SvdCache.load_or_build(engine) if prof.needs_svd else None
        backends[f"{p} ({prof.search}, {prof.sparsity:.0%})"] = SparseBackend(
            engine, [m for m in prof.modules if m.t >= 0], svd)
    prompt = engine.tokenize("The standard library documents every module with a docstring. " * 6)[:48]

    def decode_ms(backend) -> float:
        cache = engine.new_cache(len(prompt) + args.tokens + 2)
        engine.forward(prompt, cache=cache, last_only=True)
        t = time.perf_counter()
        for i in range(args.tokens):
            engine.forward([prompt[i % len(prompt)]], cache=cache, backend=backend, last_only=True)
        return (time.perf_counter() - t) * 1000 / args.tokens

    for b in backends.values():
        decode_ms(b)  # JIT warm-up
    ratios: dict[str, list[float]] = {k: [] for k in backends}
    dense: list[float] = []
    sparse: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(args.rounds):
        d = decode_ms(None)
        dense.append(d)
        for k, b in backends.items():
            s = decode_ms(b)
            sparse[k].append(s)
            ratios[k].append(d / s)
    print(f"native dense: {np.median(dense):.1f} ms/token ({1000 / np.median(dense):.1f} t/s), threads {args.threads}")
    for k in backends:
        print(f"{k}: {np.median(sparse[k]):.1f} ms/token ({1000 / np.median(sparse[k]):.1f} t/s), "
              f"speedup {np.median(ratios[k]):.2f}× (rounds: {', '.join(f'{r:.2f}' for r in ratios[k])})")


if __name__ == "__main__":
    main()
