"""edge.memory's predicted peak RSS against the measured one, one child process per row.

Models: the bundled SmolLM2-135M (Q4_1) and a TinyLlama-1.1B-shaped checkpoint with random
weights (benchmarks/convert_vs_llamacpp.py's), converted with `edge convert` and quantized
with `edge quantize` (Q4_0, Q8_0; Q4_K_M for the repack comparison), cached in --workdir.
Each row loads a Runtime the way `edge run` does (edge.cli imported), decodes a prompt of
random tokens that fills the context but a few cells, and generates 4 tokens greedily;
the child reads VmHWM, RssAnon and RssFile from /proc/self/status after the first batch
and at the end. KV q8_0 rows use flash attention (llama.cpp requires it for a quantized V).
Then it pages the model mapping out (madvise MADV_PAGEOUT, what memory pressure would do),
runs a 64-token prompt and 16 tokens, and reads VmRSS: the working set that came back,
against the predicted `working_set` (peak less reclaimable idle and unread pages).

    python benchmarks/memory_model.py [--workdir DIR] [--only smollm2|tinyllama] [--quick]
    python benchmarks/memory_model.py --repack [--workdir DIR]   # repack on/off: RSS and speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def child(cfg: dict) -> dict:
    """One session in this (fresh) process; returns measured figures."""
    if cfg.get("process", "cli") == "cli":
        import edge.cli  # noqa: F401  - the `edge run` process: every subcommand's imports
    from edge.runtime import Runtime, RuntimeConfig, Sampling

    marks = {"import": status()}
    rc = RuntimeConfig(n_ctx=cfg["n_ctx"], n_batch=cfg["n_batch"], threads=cfg.get("threads", 1),
                       type_k=cfg["kv"], type_v=cfg["kv"], flash_attn=cfg["fa"], repack=cfg["repack"],
                       use_mmap=cfg.get("mmap", True))
    rt = Runtime(cfg["model"], rc)
    marks["load"] = status()
    import numpy as np

    rng = np.random.default_rng(0)
    n_vocab = rt.llm.n_vocab()
    bos = rt.llm.token_bos()
    speeds = {}
    fills = cfg["fills"]
    for i, n in enumerate(fills):
        toks = [bos] + [int(t) for t in rng.integers(3, n_vocab, n - 1)]
        stream = rt.stream(toks, max_tokens=cfg.get("gen", 4), sampling=Sampling(temp=0.0))
        for _ in stream:
            pass
        assert rt.last is not None
        speeds[str(n)] = {"pp_tps": rt.last.prompt_tps, "tg_tps": rt.last.gen_tps,
                          "n_prompt": rt.last.n_prompt_evaluated, "n_gen": rt.last.n_gen_tokens}
        marks[f"fill{i}"] = status()
        rt.llm.reset()
        rt.llm._ctx.kv_cache_clear()
    if cfg.get("pageout"):
        # drop every page of the model mapping, then run: what comes back is what is read
        page_out(cfg["model"])
        marks["paged_out"] = status()
        toks = [bos] + [int(t) for t in rng.integers(3, n_vocab, 63)]
        for _ in rt.stream(toks, max_tokens=16, sampling=Sampling(temp=0.0)):
            pass
        marks["after_pageout"] = status()
    return {"marks": marks, "speeds": speeds, "n_ctx": rt.n_ctx}


def page_out(path: str) -> None:
    """madvise(MADV_PAGEOUT) over this process's mappings of `path` (Linux ≥ 5.4)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(lo, hi - lo, 21) != 0:  # MADV_PAGEOUT
                    raise OSError(ctypes.get_errno(), "madvise(MADV_PAGEOUT) failed")


def run_child(cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_tinyllama(work: Path, quants: tuple[str, ...] = ("Q4_0", "Q8_0", "Q4_K_M")) -> dict[str, Path]:
    """TinyLlama-1.1B-shaped random checkpoint → f16 GGUF → `quants` (cached)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from convert_vs_llamacpp import write_checkpoint

    hf = work / "tinyllama-hf"
    if not (hf / ".complete").exists():
        print("writing a TinyLlama-1.1B-shaped random f16 checkpoint ...", flush=True)
        write_checkpoint(hf)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    f16 = work / "tinyllama.f16.gguf"
    if not f16.exists():
        subprocess.run([sys.executable, "-m", "edge", "convert", str(hf), "-o", str(f16), "--outtype", "f16"],
                       check=True, env=env)
    out = {}
    for q in quants:
        path = work / f"tinyllama.{q}.gguf"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "edge", "quantize", str(f16), "-o", str(path), "--type", q],
                           check=True, env=env)
        out[q] = path
    return out


LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", "hidden_act": "silu",
}


def build_llama7b(work: Path, keep: bool = False) -> dict[str, Path]:
    """Llama-2-7B-shaped random checkpoint → Q4_K_M and Q4_0 (13.5 GB f16 on the way, removed)."""
    import shutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from convert_vs_llamacpp import write_checkpoint

    out = {q: work / f"llama7b.{q}.gguf" for q in ("Q4_K_M", "Q4_0")}
    if all(p.exists() for p in out.values()):
        return out
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hf, f16 = work / "llama7b-hf", work / "llama7b.f16.gguf"
    if not f16.exists():
        if not (hf / ".complete").exists():
            print("writing a Llama-2-7B-shaped random f16 checkpoint (13.5 GB) ...", flush=True)
            write_checkpoint(hf, config=LLAMA2_7B, shards=16)
        subprocess.run([sys.executable, "-m", "edge", "convert", str(hf), "-o", str(f16), "--outtype", "f16"],
                       check=True, env=env)
        if not keep:
            shutil.rmtree(hf)
    for q, path in out.items():
        if not path.exists():
            subprocess.run([sys.executable, "-m", "edge", "quantize", str(f16), "-o", str(path), "--type", q],
                           check=True, env=env)
    if not keep:
        f16.unlink()
    return out


def predict(model: Path, cfg: dict, n_filled: int):
    from edge.gguf_file import inspect
    from edge.memory import SessionParams, estimate

    p = SessionParams(n_ctx=cfg["n_ctx"], n_batch=cfg["n_batch"], type_k=cfg["kv"], type_v=cfg["kv"],
                      flash_attn=cfg["fa"], repack=cfg["repack"], use_mmap=cfg.get("mmap", True),
                      n_filled=n_filled)
    return estimate(inspect(model), p)


def rows_for(name: str, model: Path, contexts: list[int], quick: bool,
             kvs: tuple[str, ...] = ("f16", "q8_0")) -> list[dict]:
    rows = []
    for n_ctx in contexts:
        for kv in kvs:
            first = min(512, n_ctx - 8)
            fills = [first] if quick or first == n_ctx - 8 else [first, n_ctx - 8]
            cfg = {"model": str(model), "n_ctx": n_ctx, "n_batch": 512, "kv": kv, "fa": kv != "f16",
                   "repack": True, "fills": fills, "pageout": True}
            t0 = time.perf_counter()
            res = run_child(cfg)
            for i, n in enumerate(fills):
                m = res["marks"][f"fill{i}"]
                e = predict(model, cfg, n + 4)
                rows.append({"model": name, "n_ctx": n_ctx, "kv": kv + (" +FA" if cfg["fa"] else ""),
                             "filled": n + 4, "pred": e.peak_rss, "meas": m["VmHWM"],
                             "pred_anon": e.anon, "meas_anon": m["RssAnon"], "pred_file": e.file,
                             "meas_file": m["RssFile"], "required": e.required,
                             "reclaimable": e.reclaimable, "working_set": e.working_set,
                             "resident": res["marks"]["after_pageout"]["VmRSS"] if i == len(fills) - 1 else None})
                r = rows[-1]
                print(f"{name} ctx={n_ctx} kv={kv} fill={n + 4}: pred {r['pred'] / MiB:.0f} MiB, "
                      f"meas {r['meas'] / MiB:.0f} MiB ({(r['pred'] / r['meas'] - 1) * 100:+.1f}%), "
                      f"anon {r['pred_anon'] / MiB:.0f}/{r['meas_anon'] / MiB:.0f}, "
                      f"file {r['pred_file'] / MiB:.0f}/{r['meas_file'] / MiB:.0f} "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | --ctx | KV | tokens in KV | predicted peak RSS | measured (VmHWM) | error | "
             "anon pred / meas | file pred / meas | required | working set pred / meas |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_ctx']} | {r['kv']} | {r['filled']} | {r['pred'] / MiB:,.0f} MiB | "
            f"{r['meas'] / MiB:,.0f} MiB | {(r['pred'] / r['meas'] - 1) * 100:+.1f}% | "
            f"{r['pred_anon'] / MiB:,.0f} / {r['meas_anon'] / MiB:,.0f} | "
            f"{r['pred_file'] / MiB:,.0f} / {r['meas_file'] / MiB:,.0f} | {r['required'] / MiB:,.0f} MiB | "
            + (f"{r['working_set'] / MiB:,.0f} / {r['resident'] / MiB:,.0f} MiB |" if r["resident"] else "|"))
    return "\n".join(lines)


def repack_comparison(models: dict[str, Path], repeats: int = 3) -> str:
    """RSS, pp512 and tg32 with llama.cpp's repack on and off (alternating, median of repeats)."""
    import statistics

    lines = ["| model | repack | peak RSS | anon | file | pp512 t/s | tg32 t/s | predicted peak / required |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, path in models.items():
        got: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(repeats):
            for repack in (True, False):
                cfg = {"model": str(path), "n_ctx": 1024, "n_batch": 512, "kv": "f16", "fa": False,
                       "repack": repack, "fills": [512], "gen": 32}
                got[repack].append(run_child(cfg))
        for repack in (True, False):
            rs = got[repack]
            m = rs[-1]["marks"]["fill0"]
            pp = statistics.median(r["speeds"]["512"]["pp_tps"] for r in rs)
            tg = statistics.median(r["speeds"]["512"]["tg_tps"] for r in rs)
            e = predict(path, {"n_ctx": 1024, "n_batch": 512, "kv": "f16", "fa": False, "repack": repack}, 544)
            lines.append(f"| {name} | {'on' if repack else 'off'} | {m['VmHWM'] / MiB:,.0f} MiB | "
                         f"{m['RssAnon'] / MiB:,.0f} MiB | {m['RssFile'] / MiB:,.0f} MiB | {pp:.1f} | {tg:.1f} | "
                         f"{e.peak_rss / MiB:,.0f} / {e.required / MiB:,.0f} MiB |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/edge-bench-memory")
    ap.add_argument("--only", choices=("smollm2", "tinyllama"))
    ap.add_argument("--quick", action="store_true", help="first batch only (no full-context fill)")
    ap.add_argument("--repack", action="store_true", help="measure repack on/off instead")
    ap.add_argument("--llama7b", action="store_true", help="a Llama-2-7B-shaped Q4_K_M and Q4_0 (first batch)")
    ap.add_argument("--tl-quants", default="Q4_0,Q8_0", help="TinyLlama-shaped quant types to measure")
    ap.add_argument("--smol-contexts", default="512,2048,8192", help="SmolLM2 contexts to measure")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from edge.catalog import default_entry
    from edge.memory import CpuFeatures

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {CpuFeatures.detect().family}", flush=True)
    if args.repack:
        tl = build_tinyllama(work)
        print(repack_comparison({"TinyLlama-shaped Q4_0": tl["Q4_0"], "TinyLlama-shaped Q4_K_M": tl["Q4_K_M"]}))
        return
    rows = []
    if args.llama7b:
        l7 = build_llama7b(work)
        for q in ("Q4_K_M", "Q4_0"):
            rows += rows_for(f"Llama-2-7B-shaped {q}", l7[q], [512, 2048], True, kvs=("f16",))
        print()
        print(table(rows))
        print(repack_comparison({f"Llama-2-7B-shaped {q}": p for q, p in l7.items()}, repeats=1))
        return
    if args.only in (None, "smollm2"):
        contexts = [int(c) for c in args.smol_contexts.split(",")]
        rows += rows_for("SmolLM2-135M Q4_1", default_entry().local_path, contexts, args.quick)
    if args.only in (None, "tinyllama"):
        quants = tuple(args.tl_quants.split(","))
        tl = build_tinyllama(work, quants)
        for q in quants:
            rows += rows_for(f"TinyLlama-shaped {q}", tl[q], [512, 1024, 2048], args.quick)
    print()
    print(table(rows))
    worst = max(abs(r["pred"] / r["meas"] - 1) for r in rows)
    print(f"\nworst error {worst * 100:.1f}% over {len(rows)} rows (acceptance: ≤ 10% on every row)")


if __name__ == "__main__":
    main()
