"""The quantized engine's two decode kernels, C (edge/sparse/qkernels.c) vs numba, interleaved.

On the bundled model's q8 and q4 rows (built from its f16 copy), per thread count: dense
decode (every row), R-Sparse-free "all rows skipped" decode (what is left: output layer,
embedding row, attention, norms and the call from Python), each median ms/token over
--rounds, and the ratio numba / C. Also the per-token Python overhead of decode() (its
time minus the bare ctypes call, C only) and each path's peak RSS in a child process.

    python benchmarks/qkernels_c_vs_numba.py [--rounds 5] [--tokens 32] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's edge


def decode_ms(qe, n: int, threads: int) -> float:
    from edge.sparse.qengine import set_threads

    set_threads(threads)
    cache = qe.new_cache(n + 8)
    qe.prefill([1, 2, 3, 4], cache)
    t = time.perf_counter()
    for i in range(n):
        qe.decode(5 + i, cache)
    return (time.perf_counter() - t) / n * 1000


def child(kernels: str, weights: str) -> None:
    from edge.catalog import resolve_model
    from edge.dequant import f16_copy
    from edge.sparse.qengine import QuantizedEngine
    from edge.system import peak_rss_bytes

    qe = QuantizedEngine.load(f16_copy(resolve_model(None)), weights=weights, kernels=kernels)
    decode_ms(qe, 16, 1)
    print(json.dumps({"peak_rss": peak_rss_bytes()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    import numpy as np

    from edge.catalog import resolve_model
    from edge.dequant import f16_copy
    from edge.sparse.qengine import QuantizedEngine

    src = f16_copy(resolve_model(None))
    print(f"start: load {os.getloadavg()}", flush=True)
    eng = {}
    for w in ("q8", "q4"):
        for k in ("c", "numba"):
            eng[(w, k, "dense")] = qe = QuantizedEngine.load(src, weights=w, kernels=k)
            eng[(w, k, "skipped")] = fl = QuantizedEngine(qe.info, qe.store, kernels=k)
            fl.thr[:] = np.float32(3e38)
    threads = [int(x) for x in a.threads.split(",")]
    times: dict[tuple, list[float]] = {}
    for r in range(a.rounds + 1):  # round 0: JIT compile and page-in, not kept
        for t in threads:
            for key, qe in eng.items():
                ms = decode_ms(qe, a.tokens if r else 2, t)
                if r:
                    times.setdefault((*key, t), []).append(ms)
    print("| rows | threads | decode | C ms/token | numba ms/token | numba / C |\n|---|---|---|---|---|---|")
    for w in ("q8", "q4"):
        for t in threads:
            for what in ("dense", "skipped"):
                c, n = (float(np.median(times[(w, k, what, t)])) for k in ("c", "numba"))
                print(f"| {w} | {t} | {what} | {c:.2f} | {n:.2f} | {n / c:.2f} |")
    for k in ("c", "numba"):
        out = subprocess.run([sys.executable, __file__, "--child", k, "q8"], capture_output=True, text=True)
        rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"] / 1e6 if out.returncode == 0 else None
        print(f"peak RSS, {k} kernels, q8 dense decode in a fresh process: {rss:.0f} MB" if rss else out.stderr[-500:])
    print(f"end: load {os.getloadavg()}")


if __name__ == "__main__":
    main()
