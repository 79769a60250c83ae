"""What could any correction that moves each category as a whole score on issue 16's CrowS
checks? Answered from a split run's uncorrected scores alone (its --out folder's
shared.npz and results.json): no model is run, so it takes seconds.

Each held-out pair's difference (more − less) is shifted by a fixed amount per category:
- `cal α`: α × that category's mean on the split's calibration rows, the correction a fit
  would make if it did exactly what its calibration rows ask, α of the way (a learned edit
  generalises part of the way; α = 1 is a perfect category-level fit);
- `held`: the category's own held-out mean, which no fit from the calibration rows can know
  (the ceiling of a category-level correction: every category's mean lands on 0);
- `held median`, `cal median α`: the same with medians (each category's pct lands on 50
  instead of its mean on 0: the two differ where a category's differences are skewed).
- `shrink α δ σ`: a correction that acts per pair, each difference d moved by
  −α·d − δ + σ·ε (ε standard normal, seeded by the split): α the share of every pair's
  difference taken away (a learned edit's held-out slope, negated), δ a shift common to all,
  σ what the correction does to a pair beyond that (its residual SD on held-out pairs).
  The runs' own corrections are placed on the same scale from their results.json
  (slope, shift and residual SD of their held-out changes), so one reads how far they are
  from the region that passes.
The kept-out category is never shifted. Each variant is judged by the split runner's own
checks (bias.judge, bias.splits.CHECKS) on the same rows the runner judges.

    python benchmarks/bias_ceiling.py RUN [--calib-frac 0.4] [--alpha 0.5,1] [--shrink 0.6,0.15,0.5 ...]

--calib-frac re-splits with another calibration share (the rows are all scored in a
5-split run, since the splits together cover the suite).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from bias_gating import suite_of

CHECKS = ("ci_contains_50_after_excluded_before", "paired_change_significant", "no_category_made_worse",
          "no_biased_category_made_worse", "biased_categories_moved", "biased_categories_closer")


def shifts(d: np.ndarray, cats: np.ndarray, cal: np.ndarray, held: np.ndarray, exclude: str | None,
           variant: str, seed: int = 0) -> np.ndarray:
    """Each held-out row's shift under `variant`: "held" or "held median" (the held-out rows'
    own mean or median), "cal α" or "cal median α" (α × the calibration rows'), or
    "shrink α δ σ" (α·d + δ − σ·ε per row: subtracted, the change −α·d − δ + σ·ε)."""
    words = variant.split()
    if words[0] == "shrink":
        a, delta, sigma = (float(x) for x in words[1:])
        out = a * d[held] + delta - sigma * np.random.default_rng(seed).standard_normal(len(held))
        out[cats[held] == exclude] = 0.0
        return out
    stat = np.median if "median" in words else np.mean
    out = np.zeros(len(held))
    for c in np.unique(cats[held]):
        if c == exclude:
            continue
        at = cats[held] == c
        if words[0] == "held":
            out[at] = stat(d[held][at])
        else:
            out[at] = float(words[-1]) * stat(d[cal][cats[cal] == c])
    return out


def judge_shift(more: np.ndarray, less: np.ndarray, cats: np.ndarray, held: np.ndarray, shift: np.ndarray,
                exclude: str | None) -> tuple[str, dict[str, Any]]:
    from bias.judge import judge_pair_rows
    from bias.splits import CHECKS as RUNNER

    j = judge_pair_rows((more[held], less[held]), (more[held] - shift, less[held]), cats[held].tolist())
    rec = {"heldout": j.to_dict(), "categories": j.category_moves(exclude)}
    p, mv = j.pct, rec["categories"]
    stuck = [c for c in mv["biased_before"] if c not in mv["moved_toward_neutral"]]
    line = (f"pct {p.before.value:.1f} [{p.before.lo:.1f}, {p.before.hi:.1f}] → {p.after.value:.1f} "
            f"[{p.after.lo:.1f}, {p.after.hi:.1f}]; moved {len(mv['moved_toward_neutral'])}/{len(mv['biased_before'])}"
            f"{' (not ' + ', '.join(stuck) + ')' if stuck else ''}; worse: {', '.join(mv['made_worse']) or 'none'}")
    return line, {k: bool(RUNNER[k](rec)) for k in CHECKS}


def measured(run: dict[str, Any]) -> None:
    """Each of the run's corrections as a shrink variant: its held-out changes' slope on the
    initial difference (α = −slope), their shift at d = 0 (δ) and residual SD (σ)."""
    for s in run["splits"]:
        for method, r in s.get("methods", {}).items():
            g = r.get("heldout", {}).get("diagnostics")
            if not g or g.get("slope") is None:
                continue
            before = r["heldout"]["mean_ll_diff"]["before"]["value"]
            delta = -(g["mean_change"] - g["slope"] * before)
            sigma = g["sd_change"] * np.sqrt(max(0.0, 1 - g["corr"] ** 2))
            print(f"split {s['seed']} {method}: measured as shrink {-g['slope']:.2f} {delta:.2f} {sigma:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the --out folder of a mitigate --splits run (its shared work suffices)")
    ap.add_argument("--calib-frac", type=float, default=None, help="re-split with this calibration share")
    ap.add_argument("--alpha", default="0.5,1", help="the calibration-mean variants' fractions")
    ap.add_argument("--shrink", action="append", metavar="α,δ,σ",
                    help="a per-pair variant: each difference d changed by −α·d − δ + σ·noise (repeatable; "
                         "default: the learned edit's measured 0.2,0,2.8 and 0.5,0.15,1 and 0.6,0.15,0.5)")
    args = ap.parse_args()
    from bias.splits import SplitsConfig
    from bias.suites import load_suite

    run = json.loads((args.out / "results.json").read_text())
    c = run["config"]
    cfg = SplitsConfig(n_splits=c["n_splits"], seed=c["seed"], calib_frac=c["calib_frac"],
                       exclude_category=c["exclude_category"], calib_limit=c.get("calib_limit"),
                       heldout_limit=c.get("heldout_limit"))
    if args.calib_frac is not None:
        cfg = replace(cfg, calib_frac=args.calib_frac)
    suite = load_suite(suite_of(run))
    z = np.load(args.out / "shared.npz")
    more, less = z["more"], z["less"]
    cats = np.array([it.category for it in suite.items])
    if len(cats) != len(more):
        raise SystemExit(f"{args.out}: its scores cover {len(more)} rows but the suite has {len(cats)}")
    d = more - less
    alphas = [f"{float(a):g}" for a in args.alpha.split(",")]
    shrinks = [" ".join(f"{float(x):g}" for x in v.split(",")) for v in args.shrink or ["0.2,0,2.8", "0.5,0.15,1", "0.6,0.15,0.5"]]
    variants = ["held", "held median", *(f"cal {a}" for a in alphas), *(f"cal median {a}" for a in alphas),
                *(f"shrink {v}" for v in shrinks)]
    measured(run)
    tally = {v: dict.fromkeys(CHECKS, 0) for v in variants}
    print(f"# {args.out}: calibration share {cfg.calib_frac}, kept out {cfg.exclude_category}")
    for s in range(cfg.n_splits):
        cal, held = cfg.rows(suite, s)
        if np.isnan(d[held]).any() or np.isnan(d[cal]).any():
            raise SystemExit(f"split {s}: some rows were not scored by this run; use its own --calib-frac")
        for v in variants:
            line, ok = judge_shift(more, less, cats, held, shifts(d, cats, cal, held, cfg.exclude_category, v, s),
                                   cfg.exclude_category)
            print(f"split {s} {v:>18}: {line}")
            for k, x in ok.items():
                tally[v][k] += int(x)
    print(f"\nsplits passing (of {cfg.n_splits}):")
    for v, t in tally.items():
        print(f"  {v:>18}: " + ", ".join(f"{k} {n}" for k, n in t.items()))


if __name__ == "__main__":
    main()
