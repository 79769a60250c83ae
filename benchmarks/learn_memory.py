"""What `--method learn` holds in memory while it reads the pairs' last-layer inputs: the
model held whole in float32 (TorchLlama keep_from 0, as before) against the layers below the
edit read one at a time (keep_from L − 1, what a run does now), on a model whose weights
dominate: a TinyLlama-1.1B-shaped checkpoint with random weights (or a Llama-2-7B-shaped
one), converted with `edge convert` and quantized with `edge quantize` (cached in --workdir).

Each reading runs in a fresh child process: it builds TorchLlama, reads the last-layer rows
of --sentences random-token sentences of 12-30 tokens (CrowS-Pairs' lengths), scores them
under a random rank-4 edit of the last layer, and reports VmHWM (peak RSS), the seconds of
each part, `check_memory`'s prediction and a digest of the scores. The two ways alternate
(--rounds of each, interleaved) so that a shared machine's load falls on both alike; the
parent checks that both gave the same scores to the bit.

    python benchmarks/learn_memory.py [--model tinyllama|llama7b] [--rounds 2] [--sentences 96]

With llama7b the whole-model reading is not run when check_memory refuses it on this machine
(it needs ~26 GiB); the line says so.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
GiB = 1 << 30


def child(cfg: dict) -> dict:
    import hashlib

    import numpy as np
    import torch
    from memory_model import status

    from bias.learn import TorchLlama, check_memory, edit_of
    from edge.fold import FoldPlan, ResidualEdit

    torch.set_num_threads(cfg["threads"])
    path = Path(cfg["model"])
    t0 = time.perf_counter()
    m = TorchLlama(path, keep_from=cfg["keep_from"])
    t_load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    n_vocab = int(m.emb.shape[0])
    seqs = [[1, *(int(t) for t in rng.integers(3, n_vocab, int(rng.integers(12, 31))))] for _ in range(cfg["sentences"])]
    rows = sum(len(s) - 1 for s in seqs)
    t0 = time.perf_counter()
    r = m.rows(seqs, [1] * len(seqs))
    t_rows = time.perf_counter() - t0
    g = np.random.default_rng(1)
    plan = FoldPlan({m.n_layers - 1: ResidualEdit(*(g.normal(0, 0.05, shape).astype(np.float32)
                                                    for shape in ((m.n_embd, 4), (m.n_embd, 4), m.n_embd)))})
    t0 = time.perf_counter()
    sums = m.row_sums(r, edit_of(plan))
    t_score = time.perf_counter() - t0
    st = status()
    return {"keep_from": cfg["keep_from"], "peak": st["VmHWM"], "file": st["RssFile"], "anon": st["RssAnon"], "load_s": t_load, "rows_s": t_rows,
            "score_s": t_score, "rows": rows,
            "predicted": check_memory(path, available=1 << 50, rows=rows, keep_from=cfg["keep_from"]),
            "digest": hashlib.sha256(np.ascontiguousarray(sums).tobytes()).hexdigest()[:16]}


def run_child(cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tinyllama", "llama7b"), default="tinyllama")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edge-learn-memory"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    from memory_model import build_llama7b, build_tinyllama

    from bias.learn import check_memory
    from edge.engine.weights import WeightReader
    from edge.errors import InsufficientMemoryError

    a.workdir.mkdir(parents=True, exist_ok=True)
    model = (build_tinyllama(a.workdir, (a.quant,)) if a.model == "tinyllama" else build_llama7b(a.workdir))[a.quant]
    L = WeightReader(model).args.n_layers
    ways = {"whole model (keep_from 0)": 0, f"layers below the edit read a pass at a time (keep_from {L - 1})": L - 1}
    runnable = {}
    for name, k in ways.items():
        try:
            check_memory(model, keep_from=k)
            runnable[name] = k
        except InsufficientMemoryError as e:
            print(f"{name}: not run here: {e}")
    print(f"# {model.name}, {L} layers, {a.sentences} sentences, {a.threads} threads, {a.rounds} interleaved rounds; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    got: dict[str, list[dict]] = {n: [] for n in runnable}
    for _ in range(a.rounds):
        for name, k in runnable.items():
            got[name].append(run_child({"model": str(model), "keep_from": k, "sentences": a.sentences,
                                        "threads": a.threads}))
            g = got[name][-1]
            print(f"  {name}: peak {g['peak'] / GiB:.2f} GiB (predicted {g['predicted'] / GiB:.2f}; at the end "
                  f"{g['anon'] / GiB:.2f} anonymous, {g['file'] / GiB:.2f} file pages); load "
                  f"{g['load_s']:.1f} s, rows {g['rows_s']:.1f} s, score {g['score_s']:.2f} s; digest {g['digest']}",
                  flush=True)
    digests = {g["digest"] for v in got.values() for g in v}
    if not digests:
        return
    print(f"scores identical across ways and rounds: {len(digests) == 1} ({sorted(digests)})")
    if len(runnable) == 2:
        (w, lw), (lo, ll) = got.items()
        med = lambda v, k: sorted(x[k] for x in v)[len(v) // 2]  # noqa: E731
        print(f"peak RSS, layers a pass at a time / whole: {med(ll, 'peak') / med(lw, 'peak'):.3f} "
              f"({med(ll, 'peak') / GiB:.2f} / {med(lw, 'peak') / GiB:.2f} GiB)")
        for k in ("load_s", "rows_s"):
            print(f"{k[:-2]} time ratio, a pass at a time / whole: {med(ll, k) / med(lw, k):.3f}")


if __name__ == "__main__":
    main()
