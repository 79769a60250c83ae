"""Native quantized sparse decode vs llama.cpp's dense decode at equal weight bits, one run.

For each model (the bundled SmolLM2-135M; a TinyLlama-1.1B-shaped random checkpoint this
script writes and converts with `edge convert`):

- one f16 source GGUF (the bundled model's cached f16 copy, edge.dequant; the converted
  checkpoint), quantized by llama.cpp to Q8_0 and Q4_0 (edge.quantize), and edge's q8 and
  q4 rows built from the same f16 source (edge.sparse.qrows);
- R-Sparse profiles at 40/50/60%, calibrated on the model's own activations on CALIB text
  (benchmarks/texts.py): on the bundled model what `edge sparsify` makes (greedy search,
  --search uniform for TEAL-style), on the random 1.1B uniform α = 1 (random weights have
  no structure to search); the skip fraction reported is the one measured while decoding;
- speed: rounds × threads (1, 2) × configurations, interleaved: a 128-token prompt
  (dense prefill) then 64 decoded tokens (greedy); decode and prefill t/s, the ratio to
  llama.cpp at equal bits (q8 vs Q8_0, q4 vs Q4_0);
- weight bytes read per token (native: rows actually read, from the active counts;
  llama.cpp: every weight tensor once plus one embedding row), peak RSS (each
  configuration alone in a child process: prefill + decode), PPL on EVAL text (never used
  for calibration) with TEAL's protocol (context half dense, scored half decoded with the
  sparse quantized rows as they run), llama.cpp's PPL on the same halves;
- the floor: decode with every projection row skipped (output layer, attention, norms,
  the call), the output layer's share, and the per-token Python overhead;
- exactness at s = 0: the q8 engine's decode logits against llama.cpp on the Q8_0 file
  over 512 teacher-forced tokens (top-1 agreement, mean KL), against both of llama.cpp's
  paths (one 512-token batch, and one token per call), and those two paths against each
  other.

Prints a Markdown table and writes table.md, results.json and sparse_vs_llamacpp.png to --out.

    python benchmarks/sparse_vs_llamacpp.py [--out DIR] [--models bundled,tinyllama] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's edge, then texts.py
from texts import CALIB_MODULES, EVAL_MODULES, doc_text  # noqa: E402

LEVELS = (0.4, 0.5, 0.6)
BITS = (("q8", "Q8_0"), ("q4", "Q4_0"))


@dataclass
class Row:
    model: str
    threads: int
    engine: str  # llama.cpp | native
    bits: str  # q8 | q4
    target: float  # 0 = dense
    decode_tps: list[float] = field(default_factory=list)
    prefill_tps: list[float] = field(default_factory=list)
    skip: float | None = None  # measured share of projection input channels skipped
    read_mb: float | None = None  # weight MB read per decoded token
    read_fraction: float | None = None  # of the same engine's dense bytes
    rss_mb: float | None = None
    ppl: float | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.threads, self.engine, self.bits, self.target)

    def median(self, name: str) -> float:
        v = sorted(getattr(self, name))
        return v[len(v) // 2] if v else float("nan")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/sparse_vs_llamacpp")
    ap.add_argument("--workdir", default=None, help="where the 1.1B checkpoint and GGUFs go (default: --out)")
    ap.add_argument("--models", default="bundled,tinyllama")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--levels", default=",".join(str(s) for s in LEVELS))
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--search", default="greedy", choices=("greedy", "uniform"),
                    help="profile search on the bundled model (edge sparsify's default: greedy); the "
                         "random 1.1B model always gets uniform profiles (no structure to search)")
    ap.add_argument("--ppl-chunks", type=int, default=4, help="256-token chunks (bundled model only)")
    ap.add_argument("--exact-tokens", type=int, default=512)
    ap.add_argument("--kernels", default="auto", choices=("auto", "c", "numba"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: bundled model, 1 round, 32+16 tokens, 50%% only, 1 PPL chunk")
    ap.add_argument("--rss-child", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.models, a.rounds, a.prompt, a.gen, a.levels = "bundled", 1, 32, 16, "0.5"
        a.calib_tokens, a.ppl_chunks, a.exact_tokens = 256, 1, 128
    return a


# ---- models --------------------------------------------------------------------------------
def sources(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """name → f16 source GGUF."""
    out = {}
    for name in args.models.split(","):
        if name == "bundled":
            from edge.catalog import resolve_model
            from edge.dequant import f16_copy

            out[name] = f16_copy(resolve_model(None))
        elif name == "tinyllama":
            out[name] = tinyllama(work)
        else:
            raise SystemExit(f"--models: unknown model {name!r}; use bundled and/or tinyllama")
    return out


def tinyllama(work: Path) -> Path:
    """The TinyLlama-1.1B-shaped random checkpoint (benchmarks/convert_vs_llamacpp.py's
    builder), converted to an f16 GGUF with edge convert; cached in the workdir."""
    gguf = work / "tinyllama-random.f16.gguf"
    if gguf.is_file():
        return gguf
    from convert_vs_llamacpp import write_checkpoint

    from edge.convert import convert

    hf = work / "tinyllama-random-hf"
    if not (hf / "config.json").is_file():
        print("writing the 1.1B-shaped random checkpoint ...", flush=True)
        write_checkpoint(hf)
    print("edge convert → f16 GGUF ...", flush=True)
    convert(hf, gguf, outtype="f16")
    return gguf


def llama_files(src: Path, work: Path) -> dict[str, Path]:
    from edge.quantize import quantize

    out = {}
    for _, q in BITS:
        p = work / f"{src.stem}.{q}.gguf"
        if not p.is_file():
            quantize(src, p, qtype=q)
        out[q] = p
    return out


def profiles(src: Path, levels: list[float], work: Path, calib_tokens: int, with_ppl: bool,
             ppl_chunks: int, search: str = "uniform") -> tuple[dict[float, Path], dict[str, Any]]:
    """Profiles calibrated on CALIB text: uniform α = 1, or what `edge sparsify --search
    greedy` makes (the bundled model's quality figures: the profile a user would run);
    with_ppl: the f32 engine's sparse PPL at 50% on EVAL text (the reference the 8-bit rows
    are held to)."""
    from edge.engine import Engine
    from edge.sparse.calibrate import calibrate
    from edge.sparse.profile import SparseProfile, build_specs, model_sparsity
    from edge.sparse.search import uniform
    from edge.sparse.sparsify import sparsify

    paths = {s: work / f"{src.stem}.{search}{int(s * 100)}.json" for s in levels}
    ref: dict[str, Any] = {}
    if all(p.is_file() for p in paths.values()) and not with_ppl:
        return paths, ref
    engine = Engine.from_gguf(src)
    cal = calibrate(engine, doc_text(CALIB_MODULES), max_tokens=calib_tokens)
    calib_file = work / "calib.txt"
    calib_file.write_text(doc_text(CALIB_MODULES), encoding="utf-8")
    for s, p in paths.items():
        if p.is_file():
            continue
        if search == "greedy":
            print(f"edge sparsify --search greedy at {s:.0%} ...", flush=True)
            sparsify(engine, sparsity=s, calib=calib_file, out=p, method="greedy", lowrank=False,
                     max_calib_tokens=calib_tokens, force=True)
            continue
        alloc = uniform(engine, s, 1.0)
        SparseProfile(model_fingerprint=engine.info.fingerprint, model_name=engine.info.name,
                      calib_sha256=cal.text_sha256, calib_tokens=len(cal.tokens), target_sparsity=s,
                      sparsity=round(model_sparsity(engine, alloc), 4), search="uniform", kl=None,
                      modules=build_specs(engine, cal, alloc)).save(p)
    if with_ppl and 0.5 in paths:
        from edge.sparse.evaluate import sparse_perplexity
        from edge.sparse.rsparse import SparseBackend

        prof = SparseProfile.load(paths[0.5], engine)
        r = sparse_perplexity(engine, eval_tokens(engine, ppl_chunks), SparseBackend(
            engine, [m for m in prof.modules if m.t >= 0], None), chunk=256)
        ref = {"f32_dense_ppl": r.dense_ppl, "f32_sparse50_ppl": r.ppl, "f32_sparse50_kl": r.kl}
    return paths, ref


def eval_tokens(engine: Any, chunks: int) -> list[int]:
    return engine.tokenize(doc_text(EVAL_MODULES))[: 256 * chunks]


# ---- one measurement -----------------------------------------------------------------------
def blas_threads(n: int) -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def native_run(qe: Any, prompt: list[int], n_gen: int, threads: int) -> tuple[float, float]:
    """(prefill t/s, decode t/s): dense prefill of the prompt, then n_gen greedy decodes."""
    import numpy as np

    from edge.sparse.qengine import set_threads

    set_threads(threads)
    with blas_threads(threads):
        cache = qe.new_cache(len(prompt) + n_gen + 1)
        t = time.perf_counter()
        logits = qe.prefill(prompt, cache)
        pp = len(prompt) / (time.perf_counter() - t)
        qe.reset_counts()
        tok = int(np.argmax(logits))
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(qe.decode(tok, cache)))
        return pp, n_gen / (time.perf_counter() - t)


def llama_run(bc: Any, prompt: list[int], n_gen: int) -> tuple[float, float]:
    bc.clear()
    t = time.perf_counter()
    bc._decode(prompt)
    tok = bc.first_token()  # reads the logits: waits for the prompt
    pp = len(prompt) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n_gen):
        bc._decode([tok])
        tok = bc.first_token()
    return pp, n_gen / (time.perf_counter() - t)


def llama_weight_bytes(path: Path) -> float:
    """What llama.cpp reads per decoded token: every weight tensor once, one embedding row
    (all of it when the output layer is tied to it)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    total = 0.0
    for name, t in tensors.items():
        if name == "token_embd.weight" and not tied:
            total += t.n_bytes / int(t.shape[-1])
        else:
            total += t.n_bytes
    return total


# ---- the interleaved speed rounds ---------------------------------------------------------
def speed(args: argparse.Namespace, name: str, src: Path, lfiles: dict[str, Path],
          profs: dict[float, Path], rows: dict[tuple, Row]) -> dict[str, Any]:
    from edge.bench.llama_ops import BenchContext
    from edge.llamacpp import load_model
    from edge.sparse.qengine import QuantizedEngine

    threads = [int(t) for t in args.threads.split(",")]
    engines = {}
    for bits, _ in BITS:
        base = QuantizedEngine.load(src, weights=bits, kernels=args.kernels)
        engines[(bits, 0.0)] = base
        for s, p in profs.items():
            engines[(bits, s)] = base.with_profile(p)
    prompt = engines[("q8", 0.0)].tokenize(doc_text(EVAL_MODULES))[: args.prompt]
    n_ctx = args.prompt + args.gen + 16
    llamas = {q: load_model(p) for q, p in lfiles.items()}
    ctxs = {(q, t): BenchContext(m, n_ctx=n_ctx, threads=t) for q, m in llamas.items() for t in threads}
    for r in range(args.rounds + 1):  # round 0 pages the files in and warms up: not kept
        n_gen = args.gen if r else min(4, args.gen)
        for t in threads:
            for bits, q in BITS:
                pp, tg = llama_run(ctxs[(q, t)], prompt, n_gen)
                row = rows.setdefault((name, t, "llama.cpp", bits, 0.0), Row(name, t, "llama.cpp", bits, 0.0))
                if r:
                    row.decode_tps.append(tg)
                    row.prefill_tps.append(pp)
                    row.read_mb = llama_weight_bytes(lfiles[q]) / 1e6
                for (b, s), qe in engines.items():
                    if b != bits:
                        continue
                    pp, tg = native_run(qe, prompt, n_gen, t)
                    row = rows.setdefault((name, t, "native", b, s), Row(name, t, "native", b, s))
                    if r:
                        rs = qe.read_stats()
                        row.decode_tps.append(tg)
                        row.prefill_tps.append(pp)
                        row.skip, row.read_mb, row.read_fraction = 1 - rs.active, rs.read_bytes / 1e6, rs.fraction
        print(f"  {name}: round {r}/{args.rounds} done ({load()})", flush=True)
    for c in ctxs.values():
        c.close()
    return {"kernels": engines[("q8", 0.0)].kernels, "prompt": prompt,
            "floor": floor(engines[("q8", 0.0)], prompt, threads, engines.get(("q8", 0.5)))}


def floor(qe: Any, prompt: list[int], threads: list[int], sparse: Any) -> dict[str, Any]:
    """Decode with every projection row skipped (what is left: output layer, embedding row,
    attention, norms, the call), the output layer alone, and the Python share of a step."""
    import numpy as np

    from edge.sparse import qstore as K
    from edge.sparse.qengine import QuantizedEngine, set_threads
    from edge.sparse.qengine import threads as threads_now

    fl = QuantizedEngine(qe.info, qe.store, kernels=qe.kernels)
    fl.thr[:] = np.float32(3e38)  # in place: the kernels hold a pointer to this table
    out: dict[str, Any] = {}
    n = 64
    for t in threads:
        set_threads(t)
        cache = fl.new_cache(len(prompt) + n + 1)
        fl.prefill(prompt, cache)
        t0 = time.perf_counter()
        for _ in range(n):
            fl.decode(1, cache)
        out[f"all_skipped_ms_t{t}"] = (time.perf_counter() - t0) / n * 1000
    if fl._cdec is not None:  # the Python share: decode() against the bare ctypes call
        cache = fl.new_cache(len(prompt) + 2 * n + 1)
        fl.prefill(prompt, cache)
        dec, lib = fl._cdec, fl._lib
        t0 = time.perf_counter()
        for _ in range(n):
            fl.decode(1, cache)
        t_api = time.perf_counter() - t0
        kv = cache._ckv
        import ctypes

        P = threads_now()
        t0 = time.perf_counter()
        for _ in range(n):
            lib.edge_decode(ctypes.byref(dec.model), ctypes.byref(kv), ctypes.byref(dec.ws), 1,
                            cache.n_past, fl._logits.ctypes.data, fl.counts.ctypes.data, P)
            cache.n_past += 1
        out["python_overhead_us"] = (t_api - (time.perf_counter() - t0)) / n * 1e6
        m = fl.store.mats[fl.glob[1]]
        n_in, nb = int(m[K.NROWS]), int(m[K.NBLK])
        idx = np.arange(n_in, dtype=np.int32)
        x = np.ones(n_in, np.float32)
        acc = np.zeros(nb * 32, np.float32)
        c = np.zeros(4 * nb, np.float32)
        t0 = time.perf_counter()
        for _ in range(n):
            lib.edge_accum(fl.store.u8.ctypes.data, m.ctypes.data, x.ctypes.data, idx.ctypes.data,
                           0, n_in, acc.ctypes.data, 0, nb, c.ctypes.data)
        out["output_layer_ms_t1"] = (time.perf_counter() - t0) / n * 1000
        out["output_layer_bytes_share"] = float(fl.store.nbytes("output") / fl.read_stats().dense_bytes)
    return out


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- peak RSS, each configuration alone ---------------------------------------------------
def rss_child(argv: list[str]) -> None:
    """--rss-child ENGINE PATH BITS PROFILE THREADS TOKENS GEN KERNELS: one prefill of the
    comma-separated prompt TOKENS and GEN decodes, then print this process's peak RSS."""
    from edge.system import peak_rss_bytes

    engine, path, bits, profile, threads, tokens, n_gen, kernels = argv
    prompt = [int(x) for x in tokens.split(",")]
    if engine == "llama.cpp":
        from edge.bench.llama_ops import BenchContext
        from edge.llamacpp import load_model

        bc = BenchContext(load_model(path), n_ctx=len(prompt) + int(n_gen) + 16, threads=int(threads))
        llama_run(bc, prompt, int(n_gen))
    else:
        from edge.sparse.qengine import QuantizedEngine

        qe = QuantizedEngine.load(path, None if profile == "-" else profile, weights=bits, kernels=kernels)
        native_run(qe, prompt, int(n_gen), int(threads))
    print(json.dumps({"peak_rss": own_peak_rss() or peak_rss_bytes()}))


def own_peak_rss() -> int | None:
    """VmHWM: this process's own high-water mark. ru_maxrss is not: Linux keeps it across
    exec, so a child of a big parent reports the parent's peak (measured: every child read
    1716 MB, the benchmark's own size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss(args: argparse.Namespace, name: str, src: Path, lfiles: dict[str, Path],
        profs: dict[float, Path], rows: dict[tuple, Row], prompt: list[int]) -> None:
    t = max(int(x) for x in args.threads.split(","))
    jobs = [("llama.cpp", str(lfiles[q]), bits, "-", 0.0) for bits, q in BITS]
    jobs += [("native", str(src), bits, str(profs[s]) if s else "-", s) for bits, _ in BITS for s in [0.0, *profs]]
    for engine, path, bits, prof, s in jobs:
        cmd = [sys.executable, __file__, "--rss-child", engine, path, bits, prof, str(t),
               ",".join(map(str, prompt)), str(args.gen), args.kernels]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  rss child failed: {' '.join(cmd)}\n{r.stderr[-2000:]}", flush=True)
            continue
        mb = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"] / 1e6
        for row in rows.values():
            if row.key[0] == name and row.engine == engine and row.bits == bits and row.target == s:
                row.rss_mb = mb


# ---- quality ------------------------------------------------------------------------------
def native_halves(qe: Any, chunks: list[list[int]]) -> list[Any]:
    """Logits of each chunk's scored half: context half prefilled dense, the rest decoded."""
    import numpy as np

    out = []
    for c in chunks:
        half = len(c) // 2
        cache = qe.new_cache(len(c))
        qe.prefill(c[:half], cache)
        out.append(np.stack([qe.decode(t, cache).copy() for t in c[half:-1]]))
    return out


def llama_all_logits(path: Path, tokens: list[int], n_batch: int = 512) -> Any:
    """Every position's logits; n_batch=1 takes llama.cpp's decode path token by token."""
    import numpy as np

    from edge.llamacpp import open_llama

    llm = open_llama(path, n_ctx=max(256, len(tokens)), n_batch=n_batch, n_ubatch=n_batch,
                     logits_all=True, n_threads=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def ppl_of(logits: list[Any], chunks: list[list[int]]) -> float:
    import numpy as np

    from edge.logprobs import log_softmax

    nll = [-log_softmax(lg)[np.arange(len(c) - len(c) // 2 - 1), c[len(c) // 2 + 1 :]]
           for lg, c in zip(logits, chunks, strict=True)]
    return float(np.exp(np.concatenate(nll).mean()))


def quality(args: argparse.Namespace, name: str, src: Path, lfiles: dict[str, Path],
            profs: dict[float, Path], rows: dict[tuple, Row]) -> dict[str, Any]:
    """PPL per configuration (all thread counts share it) and the s = 0 exactness figures."""
    import numpy as np

    from edge.logprobs import kl_rows
    from edge.sparse.qengine import QuantizedEngine, set_threads

    set_threads(max(int(x) for x in args.threads.split(",")))
    base = {bits: QuantizedEngine.load(src, weights=bits, kernels=args.kernels) for bits, _ in BITS}
    toks = base["q8"].tokenize(doc_text(EVAL_MODULES))
    chunks = [toks[i : i + 256] for i in range(0, 256 * args.ppl_chunks, 256)]
    ppl: dict[tuple, float] = {}
    for bits, q in BITS:
        half = [llama_all_logits(lfiles[q], c)[len(c) // 2 : -1] for c in chunks]
        ppl[("llama.cpp", bits, 0.0)] = ppl_of(half, chunks)
        for s in [0.0, *profs]:
            qe = base[bits] if s == 0 else base[bits].with_profile(profs[s])
            ppl[("native", bits, s)] = ppl_of(native_halves(qe, chunks), chunks)
    for row in rows.values():
        if row.model == name:
            row.ppl = ppl.get((row.engine, row.bits, row.target))
    n = args.exact_tokens
    want = llama_all_logits(lfiles["Q8_0"], toks[:n])
    # llama.cpp against itself: its decode path (one token per call) on the same file, the
    # yardstick for how closely two correct 8-bit code paths can agree
    want_decode = llama_all_logits(lfiles["Q8_0"], toks[:n], n_batch=1)
    f16 = llama_all_logits(src, toks[:n])  # context: how far Q8_0 itself is from its source
    qe = base["q8"]
    cache = qe.new_cache(n + 1)
    got = [qe.prefill(toks[:1], cache).copy()] + [qe.decode(t, cache).copy() for t in toks[1:n]]
    got = np.stack(got)

    def top1(a: Any, b: Any) -> float:
        return float(np.mean(a.argmax(-1) == b.argmax(-1)))

    return {"exact_tokens": n, "top1_vs_llama_q8_0": top1(got, want),
            "mean_kl_llama_q8_0_to_native_q8": float(np.mean(kl_rows(want, got))),
            "top1_native_q8_vs_llama_f16": top1(got, f16),
            "mean_kl_llama_f16_to_native_q8": float(np.mean(kl_rows(f16, got))),
            "top1_vs_llama_q8_0_decode": top1(got, want_decode),
            "mean_kl_llama_q8_0_decode_to_native_q8": float(np.mean(kl_rows(want_decode, got))),
            "top1_llama_q8_0_decode_vs_prefill": top1(want_decode, want),
            "mean_kl_llama_q8_0_prefill_to_decode": float(np.mean(kl_rows(want, want_decode))),
            "top1_llama_q8_0_vs_llama_f16": top1(want, f16),
            "mean_kl_llama_f16_to_llama_q8_0": float(np.mean(kl_rows(f16, want)))}


# ---- report -------------------------------------------------------------------------------
def table(rows: dict[tuple, Row]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = ["| model | threads | engine | bits | sparsity (target / skipped) | decode t/s | × llama.cpp "
             "(same bits) | prefill t/s | weight MB read / token (fraction) | peak RSS MB | PPL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: (r.model, r.threads, r.bits, r.engine != "llama.cpp", r.target)):
        ref = rows.get((r.model, r.threads, "llama.cpp", r.bits, 0.0))
        ratio = r.median("decode_tps") / ref.median("decode_tps") if ref and r.engine == "native" else None
        bits = {"q8": "Q8_0", "q4": "Q4_0"}[r.bits] if r.engine == "llama.cpp" else r.bits
        sp = "dense" if r.target == 0 else f"{r.target:.0%} / {f(r.skip, '.1%')}"
        frac = f" ({r.read_fraction:.2f})" if r.read_fraction is not None else ""
        lines.append(f"| {r.model} | {r.threads} | {r.engine} | {bits} | {sp} | {r.median('decode_tps'):.1f} | "
                     f"{f(ratio, '.2f')} | {r.median('prefill_tps'):.0f} | {f(r.read_mb, '.1f')}{frac} | "
                     f"{f(r.rss_mb, '.0f')} | {f(r.ppl, '.3f')} |")
    return "\n".join(lines)


def plot(rows: dict[tuple, Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in rows.values()})
    fig, axes = plt.subplots(len(models), len(BITS), figsize=(5.5 * len(BITS), 3.8 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, (bits, q) in enumerate(BITS):
            ax = axes[i][j]
            for t in sorted({r.threads for r in rows.values()}):
                nat = sorted((r for r in rows.values() if r.model == m and r.threads == t
                              and r.engine == "native" and r.bits == bits), key=lambda r: r.target)
                line = ax.plot([100 * r.target for r in nat], [r.median("decode_tps") for r in nat],
                               "o-", label=f"native {bits}, {t} thr")
                ref = rows.get((m, t, "llama.cpp", bits, 0.0))
                if ref:
                    ax.axhline(ref.median("decode_tps"), ls="--", color=line[0].get_color(),
                               label=f"llama.cpp {q} dense, {t} thr")
            ax.set_title(f"{m}: {bits} rows vs llama.cpp {q}")
            ax.set_xlabel("target sparsity (%)")
            ax.set_ylabel("decode tokens/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(out: Path, rows: dict[tuple, Row], extra: dict[str, Any]) -> None:
    """table.md and results.json as they stand (a later stage failing keeps what ran)."""
    (out / "table.md").write_text(table(rows) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": [asdict(r) for r in rows.values()], **extra},
                                                 indent=1, default=str))


def main() -> None:
    args = parse()
    if args.rss_child is not None:
        rss_child(args.rss_child)
        return
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    levels = [float(x) for x in args.levels.split(",")]
    rows: dict[tuple, Row] = {}
    extra: dict[str, Any] = {"load_start": load(), "args": vars(args)}
    print(f"start: {load()}", flush=True)
    for name, src in sources(args, work).items():
        t0 = time.perf_counter()
        lfiles = llama_files(src, work)
        profs, ref = profiles(src, levels, work, args.calib_tokens, name == "bundled", args.ppl_chunks,
                              args.search if name == "bundled" else "uniform")
        print(f"{name}: sources ready in {time.perf_counter() - t0:.0f} s ({load()})", flush=True)
        info = speed(args, name, src, lfiles, profs, rows)
        print(f"{name}: speed done ({load()})", flush=True)
        save(out, rows, {**extra, name: {k: v for k, v in info.items() if k != "prompt"}})
        rss(args, name, src, lfiles, profs, rows, info.pop("prompt"))
        if name == "bundled":
            info.update(ref)
            info.update(quality(args, name, src, lfiles, profs, rows))
        info["load_after"] = load()
        extra[name] = info
        print(json.dumps({name: info}, indent=1), flush=True)
        save(out, rows, extra)
    md = table(rows)
    print(md)
    plot(rows, out / "sparse_vs_llamacpp.png")
    print(f"end: {load()}; wrote {out}/table.md, results.json, sparse_vs_llamacpp.png")


if __name__ == "__main__":
    main()
