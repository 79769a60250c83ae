"""Do two fits of a correction move the same held-out pairs the same way? Reads the
heldout_pairs.npz that `benchmarks/bias_train.py` writes for each try (one split, the same
held-out rows) and splits each fit's per-pair change into a shrink (slope on the pair's
difference d), a common shift and the rest (its residual).

What it answers: whether the residual, the per-pair noise that keeps a category's change
from being significant (DESIGN.md "What a per-pair correction would need"), is the fit's
own variance (different between seeds: averaging fits would shrink it) or the edit's
systematic response to the pairs (the same across seeds: no number of fits removes it).

    python benchmarks/bias_train.py RUN --split 0 --try 4,1.0,200,1 --try 4,1.0,200,1,seed=1
    python benchmarks/bias_agree.py RUN/train_split0_0 RUN/train_split0_1

`--run RUN` compares instead the edits a `--method learn --splits N` run saved
(RUN/splitS/learn_edit.npz): each is scored in torch on every pair (~1 min an edit), and each
two splits' fits are compared on the rows both held out, so the two fits learned from
calibration rows that overlap by ~9% (at a 0.3 share) rather than share them all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def decompose(d: np.ndarray, change: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(slope, shift, residual) of change regressed on d by least squares."""
    a = np.column_stack([d, np.ones_like(d)])
    (slope, shift), *_ = np.linalg.lstsq(a, change, rcond=None)
    return float(slope), float(shift), change - a @ np.array([slope, shift])


def across_splits(out: Path, threads: int) -> None:
    """Each split's saved edit scored on every pair; fits compared on rows both held out."""
    from bias_gating import open_run

    from bias.audit import _sentence
    from bias.learn import edit_of, load_edit, pair_parts
    from bias.methods import _torch_rows

    cfg, rt, scorer, ctx = open_run(out, threads)
    sh = ctx.shared
    m, _ = _torch_rows(ctx)
    used = sorted({int(i) for s in range(cfg.n_splits) for part in cfg.rows(sh.suite, s) for i in part})
    toks = [(_sentence(rt, sh.suite.items[i].more)[0], _sentence(rt, sh.suite.items[i].less)[0]) for i in used]
    more, less = [a for a, _ in toks], [b for _, b in toks]
    b = pair_parts(m, more, less, None)
    d = b[0] - b[1]
    splits = [s for s in range(cfg.n_splits) if (out / f"split{s}" / "learn_edit.npz").is_file()]
    change, held = {}, {}
    for s in splits:
        a = pair_parts(m, more, less, edit_of(load_edit(out / f"split{s}" / "learn_edit.npz")))
        change[s] = a[0] - a[1] - d
        held[s] = np.isin(used, cfg.rows(sh.suite, s)[1])
    cats = np.array([sh.suite.items[i].category for i in used])
    print("split i, j: rows held out in both; each fit's slope and residual SD there; residuals' correlation")
    for i in splits:
        for j in splits:
            if j <= i:
                continue
            w = held[i] & held[j]
            (si, _, ri), (sj, _, rj) = decompose(d[w], change[i][w]), decompose(d[w], change[j][w])
            per = ", ".join(f"{c} {np.mean(ri[cats[w] == c]):+.2f}/{np.mean(rj[cats[w] == c]):+.2f}"
                            for c in ("age", "religion", "sexual-orientation"))
            print(f"  {i}, {j}: {w.sum()} rows; slope {si:+.3f} / {sj:+.3f}; residual SD {ri.std():.2f} / "
                  f"{rj.std():.2f}; correlation {np.corrcoef(ri, rj)[0, 1]:.3f}; category residuals {per}")
    scorer.close()
    rt.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tries", nargs="*", type=Path, help="bias_train.py try folders (train_splitS_I) of one split")
    ap.add_argument("--run", type=Path, help="a --method learn --splits run: compare its splits' edits")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.run:
        return across_splits(args.run, args.threads)
    runs = [np.load(t / "heldout_pairs.npz") for t in args.tries]
    d, cats = runs[0]["before"], runs[0]["categories"]
    if any(not np.array_equal(r["rows"], runs[0]["rows"]) for r in runs):
        raise SystemExit("the tries hold different held-out rows: give tries of one split")
    changes = np.array([r["after"] - r["before"] for r in runs])
    parts = [decompose(d, c) for c in changes]
    for t, (slope, shift, res) in zip(args.tries, parts, strict=True):
        print(f"{t.name}: slope {slope:+.3f}, shift {shift:+.3f}, residual SD {res.std():.3f} nats")
    if len(runs) > 1:
        res = np.array([p[2] for p in parts])
        cr = np.corrcoef(res)[np.triu_indices(len(runs), 1)]
        print(f"residuals' correlation between fits: {', '.join(f'{x:.3f}' for x in cr)}")
        slope, shift, mean_res = decompose(d, changes.mean(axis=0))
        print(f"the fits' mean change: slope {slope:+.3f}, shift {shift:+.3f}, residual SD {mean_res.std():.3f} "
              f"(one fit's: {np.mean([p[2].std() for p in parts]):.3f})")
    else:
        mean_res = parts[0][2]
    print("residual by category (the mean fit's): mean, SD, pairs")
    for c in np.unique(cats):
        m = cats == c
        print(f"  {c:20s} {mean_res[m].mean():+.3f}  {mean_res[m].std():.3f}  {m.sum()}")


if __name__ == "__main__":
    main()
