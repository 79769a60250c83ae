"""How each CrowS-Pairs category responds to steering along each category's own direction,
and whether a combination of those directions fitted on the calibration part passes issue
16's checks on the held-out part. Reads a finished `edge bias mitigate --method both
--splits N` run (its --out directory: shared.npz holds every pair's states and scores).

1. Per category c with ≥ 15 calibration pairs: d_c = mean of h(more) − h(less) over c's
   calibration pairs, per layer; V_c = −unit(d_c) scaled per layer to the norm of the run's
   own steer vector (so each push costs about what the loop's did).
2. Response matrix R[k, c]: change of category k's mean ll difference on the calibration
   pairs when V_c is applied (one scoring of the calibration part per direction), and the
   PPL rise on neutral text.
3. Coefficients a: least squares of √n_k·(R a − t_k) with a ridge term, t_k = −m_k shrunk by
   James-Stein (the part of the calibration mean its standard error vouches for); the
   combination Σ a_c V_c scaled into the 2% PPL budget, then judged on the held-out pairs.

    python benchmarks/bias_response.py /tmp/r17/out [--split 0] [--ridge 0.05]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from bias_gating import category_lines, checks, suite_of

PPL_BUDGET = 0.019  # just under the acceptance's 2%


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def directions(z: Any, cats: np.ndarray, cal: np.ndarray, steer_coef: np.ndarray) -> dict[str, np.ndarray]:
    from bias.steering import compute_directions

    d_all = compute_directions(z["h_more"][cal], z["h_less"][cal]).vectors
    scale = np.linalg.norm(d_all * steer_coef[:, None], axis=1, keepdims=True)
    out = {}
    for c in sorted(set(cats[cal].tolist())):
        rows = cal[cats[cal] == c]
        if len(rows) >= 15:
            out[c] = (-_unit(compute_directions(z["h_more"][rows], z["h_less"][rows]).vectors) * scale).astype(np.float32)
    return out


def response(sc: Any, util: Any, calsuite: Any, d_cal: np.ndarray, c_cal: np.ndarray, names: list[str],
             dirs: dict[str, np.ndarray], base_ppl: float) -> np.ndarray:
    from bias.audit import score_pairs

    R = np.zeros((len(names), len(dirs)))
    for j, (c, V) in enumerate(dirs.items()):
        t0 = time.perf_counter()
        sc.set_control_vector(V)
        mm, ll = score_pairs(sc, calsuite)
        ppl, _ = util()
        sc.set_control_vector(None)
        ch = (mm - ll) - d_cal
        R[:, j] = [ch[c_cal == k].mean() for k in names]
        print(f"direction {c:20s} PPL {100 * (ppl / base_ppl - 1):+.2f}%  "
              + " ".join(f"{k[:6]} {v:+.2f}" for k, v in zip(names, R[:, j], strict=True))
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return R


def fit(R: np.ndarray, d_cal: np.ndarray, c_cal: np.ndarray, names: list[str], ridge: float) -> np.ndarray:
    n = np.array([np.sum(c_cal == k) for k in names], dtype=np.float64)
    m = np.array([d_cal[c_cal == k].mean() for k in names])
    se = np.array([d_cal[c_cal == k].std(ddof=1) / np.sqrt(max(nk, 1)) for k, nk in zip(names, n, strict=True)])
    keep = np.clip(1 - (se / np.where(m == 0, 1.0, m)) ** 2, 0, 1)
    target = -m * keep
    print("calibration mean → target change: "
          + ", ".join(f"{k} {mk:+.2f} → {tk:+.2f}" for k, mk, tk in zip(names, m, target, strict=True)))
    A, b = R * np.sqrt(n)[:, None], target * np.sqrt(n)
    G = A.T @ A
    return np.linalg.solve(G + ridge * np.trace(G) / len(G) * np.eye(len(G)), A.T @ b)


def main() -> None:
    from bias.audit import open_scorer, score_pairs
    from bias.feedback import Utility, neutral_chunks
    from bias.judge import judge_pair_rows
    from bias.suites import load_suite
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path, help="the --out directory of a finished mitigate --splits run")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--ridge", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    run = json.loads((args.out / "results.json").read_text())
    sp, exclude = run["splits"][args.split], run["config"].get("exclude_category")
    z = np.load(args.out / "shared.npz")
    suite = load_suite(suite_of(run))
    cats = np.array([it.category for it in suite.items])
    more, less = z["more"], z["less"]
    cal, held = np.array(sp["calibration_rows"]), np.array(sp["heldout_rows"])
    dirs = directions(z, cats, cal, np.array(sp["methods"]["steer"]["fit"]["loop"]["coefficients"]))
    rt = open_runtime(None, RuntimeConfig(n_ctx=512, threads=args.threads))
    sc = open_scorer(rt, "auto")
    util = Utility(sc, neutral_chunks(rt))
    base_ppl, _ = util()
    names = sorted(set(cats[cal].tolist()))
    d_cal, c_cal = more[cal] - less[cal], cats[cal]
    print(f"## split {args.split} (seed {sp['seed']}): response of each category (rows) to each direction")
    R = response(sc, util, suite.subset(cal.tolist()), d_cal, c_cal, names, dirs, base_ppl)
    a = fit(R, d_cal, c_cal, names, args.ridge)
    V = sum(a_j * dirs[c] for a_j, c in zip(a, dirs, strict=True))
    sc.set_control_vector(V)
    ppl, _ = util()
    g = 1.0
    if ppl / base_ppl - 1 > PPL_BUDGET:  # PPL rise ~ push²
        g = float(np.sqrt(PPL_BUDGET / (ppl / base_ppl - 1)))
        sc.set_control_vector(V * g)
        ppl, _ = util()
    mm, ll = score_pairs(sc, suite.subset(held.tolist()))
    sc.set_control_vector(None)
    judged = judge_pair_rows((more[held], less[held]), (mm, ll), cats[held].tolist())
    line, ok = checks(judged, exclude)
    print("coefficients: " + ", ".join(f"{c} {x:+.2f}" for c, x in zip(dirs, a * g, strict=True)))
    print(f"held-out: {line}; PPL {100 * (ppl / base_ppl - 1):+.2f}%")
    print(ok)
    print(category_lines(judged))
    sc.close()
    rt.close()


if __name__ == "__main__":
    main()
