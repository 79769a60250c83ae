"""R-Sparse sweep on the bundled model, everything measured in one run.

Sparsity 0/30/40/50/60/70% × {searched R-Sparse (KL-guided search, α ∈ {1, 0.8}),
uniform TEAL-style α = 1}: perplexity on text not used for calibration (TEAL protocol:
context half dense, scored half sparse), KL to dense, native decode t/s (dense and sparse,
interleaved), and llama.cpp dense t/s for reference. Writes a Markdown table, a JSON
record and a PNG plot to --out.

Usage: python benchmarks/sparse_sweep.py [--out DIR] [--chunks 4] [--chunk 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from texts import CALIB_MODULES, EVAL_MODULES, doc_text  # noqa: E402

LEVELS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/sparse_sweep")
    ap.add_argument("--chunks", type=int, default=4, help="evaluation chunks")
    ap.add_argument("--chunk", type=int, default=512, help="tokens per evaluation chunk")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=1, help="layer groups per projection type")
    ap.add_argument("--search-minutes", type=float, default=3.0, help="search budget per sparsity")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="BLAS and kernel threads (both paths)")
    ap.add_argument("--levels", default=",".join(str(s) for s in LEVELS))
    return ap.parse_args()


def main() -> None:
    args = parse()
    # Same thread count for the dense BLAS path and the sparse kernel; set before numpy loads.
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["NUMBA_NUM_THREADS"] = str(max(args.threads, 1))
    import numpy as np

    from edge.catalog import default_entry
    from edge.engine import Engine
    from edge.logprobs import kl_rows
    from edge.sparse.calibrate import calibrate
    from edge.sparse.evaluate import HalfChunks
    from edge.sparse.profile import build_specs, model_sparsity
    from edge.sparse.rsparse import SparseBackend
    from edge.sparse.search import Objective, search, uniform
    from edge.sparse.svd import SvdCache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [float(s) for s in args.levels.split(",")]
    model = default_entry().local_path
    t_start = time.perf_counter()
    engine = Engine.from_gguf(model)
    cal = calibrate(engine, doc_text(CALIB_MODULES), max_tokens=args.calib_tokens)
    svd = SvdCache.load_or_build(engine)
    obj = Objective(engine, cal, svd)
    searched = {}
    for s in levels:
        if s > 0:
            res = search(engine, cal, s, method="greedy", svd=svd, groups=args.groups,
                         budget_minutes=args.search_minutes, objective=obj)
            searched[s] = res.alloc
            print(f"search {s:.0%}: KL {res.history[0]:.4f} → {res.kl:.4f} in {res.n_evals} evaluations",
                  flush=True)

    ev_tokens = engine.tokenize(doc_text(EVAL_MODULES))
    hc = HalfChunks.prepare(engine, ev_tokens, args.chunk, args.chunks)
    dense_nll = hc.nll(hc.dense_logits)
    dense_ppl = float(np.exp(dense_nll.mean()))
    print(f"eval: {len(hc.chunks)} chunks × {args.chunk} tokens, dense PPL {dense_ppl:.3f}", flush=True)

    def kl_and_ppl(backend):
        logits = hc.run(engine, backend)
        kl = float(np.mean(np.concatenate([kl_rows(d, s) for d, s in zip(hc.dense_logits, logits, strict=True)])))
        return float(np.exp(hc.nll(logits).mean())), kl

    prompt = ev_tokens[:64]

    def decode_ms(backend) -> float:
        cache = engine.new_cache(64 + args.decode_tokens + 1)
        engine.forward(prompt, cache=cache, last_only=True)
        engine.forward(prompt[-1:], cache=cache, backend=backend, last_only=True)  # warm-up (JIT)
        times = []
        for i in range(args.decode_tokens):
            t = time.perf_counter()
            engine.forward([prompt[i % 64]], cache=cache, backend=backend, last_only=True)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1000)

    rows = []
    for s in levels:
        cands = {"R-Sparse (searched)": searched.get(s, uniform(engine, s)),
                 "TEAL uniform α=1": uniform(engine, s)}
        for method, alloc in cands.items():
            if s == 0 and method.startswith("TEAL"):
                continue
            specs = [m for m in build_specs(engine, cal, alloc) if m.t >= 0]
            be = SparseBackend(engine, specs, svd) if specs else None
            ppl, kl = kl_and_ppl(be) if be else (dense_ppl, 0.0)
            # Interleave: dense, sparse, dense — the machine state is shared by both figures.
            d1, sp, d2 = decode_ms(None), decode_ms(be), decode_ms(None)
            dense_ms = (d1 + d2) / 2
            rows.append({"sparsity": s, "method": "dense" if s == 0 else method,
                         "achieved": model_sparsity(engine, alloc), "ppl": ppl, "ppl_ratio": ppl / dense_ppl,
                         "kl": kl, "dense_ms": dense_ms, "sparse_ms": sp, "dense_tps": 1000 / dense_ms,
                         "sparse_tps": 1000 / sp, "speedup": dense_ms / sp,
                         "lowrank_modules": sum(m.r > 0 for m in specs)})
            r = rows[-1]
            print(f"{s:.0%} {r['method']}: PPL {ppl:.3f} ({r['ppl_ratio']:.3f}×), KL {kl:.4f}, "
                  f"decode {r['dense_tps']:.1f} → {r['sparse_tps']:.1f} t/s ({r['speedup']:.2f}×)", flush=True)

    from edge.runtime import Runtime, RuntimeConfig
    from edge.sampling import Sampling

    rt = Runtime(model, RuntimeConfig(n_ctx=512, threads=args.threads))
    tps = []
    for _ in range(3):
        for _piece in rt.stream(prompt, max_tokens=64, sampling=Sampling(temp=0)):
            pass
        tps.append(rt.last.gen_tps)
    rt.close()
    llama_tps = float(np.median(tps))

    ok = [r for r in rows if r["method"] != "TEAL uniform α=1" and r["ppl_ratio"] <= 1.10]
    best = max(ok, key=lambda r: r["sparsity"]) if ok else None
    record = {"model": str(model), "dense_ppl": dense_ppl, "llama_cpp_dense_tps": llama_tps,
              "threads": args.threads, "eval_chunks": len(hc.chunks), "chunk": args.chunk,
              "calib_tokens": len(cal.tokens), "rows": rows, "best_within_1.10": best,
              "seconds": time.perf_counter() - t_start}
    (out / "sweep.json").write_text(json.dumps(record, indent=1))
    md = table(record)
    (out / "sweep.md").write_text(md)
    plot(record, out / "sweep.png")
    print(md)


def table(rec: dict) -> str:
    lines = [f"Dense PPL {rec['dense_ppl']:.3f} ({rec['eval_chunks']} chunks × {rec['chunk']} tokens, "
             f"scored half sparse); llama.cpp dense decode {rec['llama_cpp_dense_tps']:.1f} t/s; "
             f"threads {rec['threads']}.", "",
             "| sparsity | method | PPL | × dense | KL | native dense t/s | native sparse t/s | speedup | low-rank modules |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['sparsity']:.0%} | {r['method']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} | "
                     f"{r['kl']:.4f} | {r['dense_tps']:.1f} | {r['sparse_tps']:.1f} | {r['speedup']:.2f}× | "
                     f"{r['lowrank_modules']} |")
    b = rec["best_within_1.10"]
    lines += ["", (f"Highest sparsity with PPL ≤ 1.10× dense: {b['sparsity']:.0%} ({b['method']}, "
                   f"{b['ppl_ratio']:.3f}×, decode speedup {b['speedup']:.2f}×)") if b else
              "No sparse setting kept PPL within 1.10× dense."]
    return "\n".join(lines) + "\n"


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method, mark in (("R-Sparse (searched)", "o-"), ("TEAL uniform α=1", "s--")):
        rows = [r for r in rec["rows"] if r["method"] in (method, "dense")]
        xs = [r["sparsity"] * 100 for r in rows]
        a.plot(xs, [r["ppl_ratio"] for r in rows], mark, label=method)
        b.plot(xs, [r["speedup"] for r in rows], mark, label=method)
    a.axhline(1.10, color="grey", lw=0.8, ls=":")
    a.set_yscale("log")  # 1.04× and 50× on one axis
    a.set(xlabel="model-level sparsity (%)", ylabel="PPL / dense PPL", title="Quality (scored half sparse)")
    b.axhline(1.0, color="grey", lw=0.8, ls=":")
    b.set(xlabel="model-level sparsity (%)", ylabel="native decode speedup vs dense",
          title=f"Decode speed (llama.cpp dense {rec['llama_cpp_dense_tps']:.0f} t/s)")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
