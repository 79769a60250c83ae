"""Issue 16's acceptance table: both corrections on N seeded splits of CrowS-Pairs.

Runs `bias.methods.mitigate_splits` (what `edge bias mitigate --method both --splits N`
calls): the uncorrected scores, pair states, BBQ and generation are computed once; each
split calibrates the control-vector loop (`steer`) and directional ablation folded into
the weights (`ablate`) on 30% of the rows (disability kept out) and judges both on the
held-out rows, BBQ (the files in ../shared/data/bbq) and the probes judged by generation.
Writes results.json and report.md to --out (rewritten after every split and method, so a
Ctrl-C keeps the finished ones) and prints the report and the wall/CPU time.

    python benchmarks/ablation.py --threads 2 --splits 5 --out /tmp/ablation
        [--methods steer,ablate] [--bbq-per-condition 120] [--repeat 3] [--keep-models]
        [--agreement 300]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bias.ablate import AblateConfig
from bias.methods import mitigate_splits
from bias.splits import SplitsConfig
from bias.splits_report import report_md

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def engine_pair_scores(engine: object, items: list) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-likelihood of each sentence after BOS from the numpy engine (the scorer's
    definition), one sentence per forward."""
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(1, user_api="blas"):
        for it in items:
            row = []
            for text in (it.more, it.less):
                toks = [engine._llama_vocab().token_bos(), *engine.tokenize(text, add_bos=False)]
                x = engine.forward(toks).logits[:-1].astype(np.float64)
                x -= x.max(1, keepdims=True)
                lp = x - np.log(np.exp(x).sum(1, keepdims=True))
                row.append(float(lp[np.arange(len(toks) - 1), toks[1:]].sum()))
            out.append(row)
    a = np.array(out)
    return a[:, 0], a[:, 1]


def agreement(out: Path, n_rows: int, threads: int) -> dict:
    """Split 0's ablated model: the numpy engine with the edit folded into its float32
    weights against llama.cpp on the folded GGUFs (F16, and re-quantized to the source's
    types), on the first n_rows held-out rows."""
    from bias import metrics as M
    from bias.ablate import AblationSpec, BiasDirections, make_plan
    from bias.audit import score_pairs
    from bias.scorer import BatchScorer
    from bias.suites import load_suite
    from edge.engine import Engine
    from edge.fold import fold_weights
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    res = json.loads((out / "results.json").read_text())
    fit = res["splits"][0]["methods"]["ablate"]["fit"]["loop"]["best"]
    z = np.load(out / "split0" / "ablate_directions.npz")
    d = BiasDirections(z["layers"], z["embedding"], list(z["labels"]), [], np.zeros(1))
    spec = AblationSpec(tuple(fit["spec"]["layers"]), fit["spec"]["strength"], fit["spec"]["embedding"],
                        fit["spec"]["source_layer"])
    suite = load_suite(f"crows_pairs:{DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}")
    rows = set(res["splits"][0]["heldout_rows"][:n_rows])
    held = suite.subset([i for i, it in enumerate(suite.items) if it.row in rows])
    rt = open_runtime(None, RuntimeConfig(n_ctx=512, threads=threads))
    eng = Engine.from_gguf(rt.path)
    eng = Engine(fold_weights(eng.weights, make_plan(d, spec)))
    em, el = engine_pair_scores(eng, held.items)
    rep = {"rows": len(held.items), "engine_pct": float(M.pct_stereotype(em, el))}
    for name in ("ablate.f16.gguf", "ablate.gguf"):
        with BatchScorer(rt, model_path=out / "split0" / name) as sc:
            m, ls = score_pairs(sc, held)
        rep[name] = {"pct": float(M.pct_stereotype(m, ls)),
                     "max_abs_ll_diff": float(np.abs((m - ls) - (em - el)).max()),
                     "sign_disagreements": int(((m > ls) != (em > el)).sum())}
    rt.close()
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="steer,ablate")
    ap.add_argument("--out", default="/tmp/ablation")
    ap.add_argument("--bbq-per-condition", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=3, help="generation repeats per probe (0: no generation)")
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--max-ppl-increase", type=float, default=0.02)
    ap.add_argument("--candidates", default="category:0:-1,overall:0:-1,category:15:-1",
                    help="ablation candidates measured at full strength: SET:FIRST:LAST,...")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--agreement", type=int, default=0, metavar="ROWS",
                    help="after the run, check split 0's ablated GGUFs against the numpy engine on ROWS held-out rows")
    a = ap.parse_args()
    cfg = SplitsConfig(n_splits=a.splits, seed=a.seed, exclude_category="disability",
                       methods=tuple(a.methods.split(",")), max_ppl_increase=a.max_ppl_increase,
                       bbq_spec=f"bbq:{DATA / 'bbq'}", bbq_per_condition=a.bbq_per_condition,
                       repeat=a.repeat, temp=a.temp, keep_models=a.keep_models or a.agreement > 0)
    cands = tuple((k, int(f), int(t)) for k, f, t in (c.split(":") for c in a.candidates.split(",")))
    t0, c0 = time.perf_counter(), time.process_time()

    def show(kind: str, d: dict) -> None:
        keep = {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
        print(f"[{time.perf_counter() - t0:7.0f}s] {kind} {json.dumps(keep, default=str)}", flush=True)

    res = mitigate_splits(None, f"crows_pairs:{DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}", a.out,
                          cfg=cfg, ablate=AblateConfig(max_ppl_increase=a.max_ppl_increase, candidates=cands),
                          threads=a.threads, on_event=show)
    print(report_md(res.to_dict()))
    load = os.getloadavg()
    print(f"wall {time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s "
          f"(this process), load average now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    if a.agreement:
        print("agreement:", json.dumps(agreement(Path(a.out), a.agreement, a.threads), indent=1))


if __name__ == "__main__":
    main()
