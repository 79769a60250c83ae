"""Issue 16: does the ablated (or gated) GGUF reproduce the engine's corrected scores in
plain llama.cpp?

Reads a finished `edge bias mitigate --method ablate|gate|combo|learn|both|all` run
(results.json, split 0's saved directions, edits, words and vector, or learned edit), folds
split 0's edit into the weights the run scored with (the f16 copy for a quantized model) and
scores split 0's held-out CrowS-Pairs rows with
llama-cpp-python's own `Llama` (no edge code, no control vector), one sentence per
evaluation: on that F16 fold, and on the deployed file (re-quantized to the source's
types). Prints the held-out pct of each against the pct the run's scorer measured.

    python benchmarks/ablation_plain.py RUN_OUT_DIR [--method ablate|gate|combo|learn] [--rows N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def plain_scores(path: Path, texts: list[tuple[str, str]], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-likelihood of each sentence after BOS, from llama-cpp-python alone."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=threads, n_threads_batch=threads)
    out = []
    for pair in texts:
        row = []
        for text in pair:
            toks = [llm.token_bos(), *llm.tokenize(text.encode(), add_bos=False)]
            llm.reset()
            llm.eval(toks)
            x = np.asarray(llm.scores[: len(toks) - 1], np.float64)
            x -= x.max(1, keepdims=True)
            lp = x - np.log(np.exp(x).sum(1, keepdims=True))
            row.append(float(lp[np.arange(len(toks) - 1), toks[1:]].sum()))
        out.append(row)
    del llm
    a = np.array(out)
    return a[:, 0], a[:, 1]


def _plan(split0: Path, method: str) -> tuple[Any, str]:
    """Split 0's fold plan, rebuilt from what the run saved."""
    from bias.ablate import BiasDirections, make_plan
    from bias.gate import GateEdits

    if method == "gate":
        edits, coef = GateEdits.load(split0 / "gate_edits.npz")
        return edits.plan(coef), f"gate: {len(edits.names)} categories ×{float(coef[0]):.3g}"
    if method == "learn":
        from bias.learn import load_edit

        return load_edit(split0 / "learn_edit.npz"), "learn: the fitted low-rank edit"
    if method == "combo":
        from bias.methods import combo_plan

        d, spec = BiasDirections.load(split0 / "combo_words.npz")
        return combo_plan(make_plan(d, spec), np.load(split0 / "combo_vector.npy")), f"combo: {spec.describe()}"
    d, spec = BiasDirections.load(split0 / "ablate_directions.npz")
    return make_plan(d, spec), spec.describe()


def main() -> None:
    from bias import metrics as M
    from bias.suites import load_suite
    from edge.fold import fold_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--method", choices=["ablate", "gate", "combo", "learn"], default="ablate")
    ap.add_argument("--rows", type=int, default=0, help="first N held-out rows (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    res = json.loads((a.run / "results.json").read_text())
    s0 = res["splits"][0]
    abl = s0["methods"][a.method]
    plan, describe = _plan(a.run / "split0", a.method)
    suite = load_suite(res["shared"]["suite"] if ":" in res["shared"]["suite"]
                       else f"crows_pairs:{res['shared']['suite']}")
    by_row = {it.row: it for it in suite.items}
    n = a.rows or len(s0["heldout_rows"])
    held = [by_row[r] for r in s0["heldout_rows"][:n]]
    em = np.array(abl["heldout_scores"]["ll_more"][:n])
    el = np.array(abl["heldout_scores"]["ll_less"][:n])
    compute = Path(res["shared"]["compute"].get("path") or res["shared"]["model"])
    f16 = a.run / "split0" / "plain.f16.gguf"
    fold_gguf(compute, f16, plan, weight_type="F16", force=True)
    texts = [(it.more, it.less) for it in held]
    rep: dict = {"rows": n, "engine_pct": float(M.pct_stereotype(em, el)), "spec": describe}
    for name, path in (("f16_fold", f16), ("deployed", Path(abl["fit"]["fold"]["path"]))):
        t0 = time.perf_counter()
        m, ls = plain_scores(path, texts, a.threads)
        rep[name] = {"path": str(path), "pct": float(M.pct_stereotype(m, ls)),
                     "pct_minus_engine": float(M.pct_stereotype(m, ls) - M.pct_stereotype(em, el)),
                     "max_abs_diff_nats": float(np.abs((m - ls) - (em - el)).max()),
                     "median_abs_diff_nats": float(np.median(np.abs((m - ls) - (em - el)))),
                     "sign_flips": int(((m > ls) != (em > el)).sum()), "seconds": time.perf_counter() - t0}
    f16.unlink(missing_ok=True)
    print(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
