"""Bias-audit speed and baseline, measured in one run on the bundled model.

1. Full CrowS-Pairs audit (batched, prefix-sharing scorer, weights per --precision, as
   `edge bias audit`): wall time, pct_stereotype + CI; with --also-file, again on the
   file's own Q4_1 kernels.
2. The naive scorer on the first N pairs (one sentence per decode, logits at every
   position: Runtime.token_logprobs on the model file) vs the batched scorer: ratio.
3. BBQ on the first M items: shared-context scoring vs each answer from scratch: ratio.

    python benchmarks/bias_speed.py [--threads 2] [--precision auto] [--also-file]
        [--naive-pairs 150] [--bbq-items 150]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bias import metrics as M
from bias.audit import _sentence, audit_suite, open_scorer, score_bbq
from bias.suites import load_suite
from edge.catalog import default_entry
from edge.runtime import Runtime, RuntimeConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--naive-pairs", type=int, default=150)
    ap.add_argument("--bbq-items", type=int, default=150)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "file", "f16"])
    ap.add_argument("--also-file", action="store_true", help="also time the full audit on Q4_1 kernels")
    a = ap.parse_args()
    rt = Runtime(default_entry().local_path, RuntimeConfig(n_ctx=512, threads=a.threads))
    print(f"threads {rt.threads}")
    crows = load_suite(f"crows_pairs:{DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}")
    runs = [a.precision, "file"] if a.also_file and a.precision != "file" else [a.precision]
    for prec in [] if a.skip_full else runs:
        t0, c0 = time.perf_counter(), time.process_time()
        sc = open_scorer(rt, prec)  # the f16 copy is made here on first use
        with sc:
            res = audit_suite(rt, crows, scorer=sc)
        e = res.overall["pct_stereotype"]
        # CPU time too: on a shared machine wall time mostly measures the other jobs.
        print(f"full CrowS-Pairs audit, --precision {prec} ({sc.record()}): "
              f"{time.perf_counter() - t0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s CPU for {res.n_items} pairs, "
              f"{res.tokens_decoded} tokens decoded + {sc.pad_tokens} pads; pct_stereotype {e.value:.2f} "
              f"[{e.lo:.2f}, {e.hi:.2f}] (reference 54.6)", flush=True)

    sub = crows.head(a.naive_pairs)
    t0, c0 = time.perf_counter(), time.process_time()
    naive = [[rt.token_logprobs(_sentence(rt, s)[0]).sum() for s in (it.more, it.less)] for it in sub.items]
    t_naive, c_naive = time.perf_counter() - t0, time.process_time() - c0
    with open_scorer(rt, a.precision) as sc:
        t0, c0 = time.perf_counter(), time.process_time()
        res = audit_suite(rt, sub, scorer=sc, n_boot=10)
        t_batch, c_batch = time.perf_counter() - t0, time.process_time() - c0
    nv = np.array(naive)
    pct_naive = float(M.pct_stereotype(nv[:, 0], nv[:, 1]))
    print(f"CrowS first {len(sub.items)} pairs: naive {t_naive:.1f} s, batched {t_batch:.1f} s, "
          f"speed-up {t_naive / t_batch:.2f}x wall, {c_naive / c_batch:.2f}x CPU "
          f"(pct_stereotype naive {pct_naive:.2f}, batched {res.overall['pct_stereotype'].value:.2f}); "
          f"full-suite naive estimate {t_naive * len(crows.items) / len(sub.items):.0f} s", flush=True)

    bbq = load_suite(f"bbq:{DATA / 'bbq'}", limit=a.bbq_items)
    with open_scorer(rt, a.precision) as sc:
        t0, c0 = time.perf_counter(), time.process_time()
        shared = score_bbq(sc, bbq)
        t_sh, c_sh, tok_sh = time.perf_counter() - t0, time.process_time() - c0, sc.tokens_decoded
        t0, c0 = time.perf_counter(), time.process_time()
        scratch = score_bbq(sc, bbq, share_prefix=False)
        t_sc, c_sc = time.perf_counter() - t0, time.process_time() - c0
        tok_sc = sc.tokens_decoded - tok_sh
    agree = float(np.mean(shared.argmax(1) == scratch.argmax(1)))
    print(f"BBQ first {len(bbq.items)} items: shared context {t_sh:.1f} s ({tok_sh} tokens), "
          f"from scratch {t_sc:.1f} s ({tok_sc} tokens), speed-up {t_sc / t_sh:.2f}x wall, "
          f"{c_sc / c_sh:.2f}x CPU; "
          f"same answer chosen for {100 * agree:.1f}% of items")
    rt.close()


if __name__ == "__main__":
    main()
