"""Where gate's overall pct fall comes from, and what a shrink plus pushes does instead.

Reads a finished `edge bias mitigate --method gate|all --splits N` run (its --out folder:
results.json and the shared cache) and, on one split, measures combinations of
- the head ablation (ablate's per-category group-word contrasts projected out of the output
  head at strength λ: a shrink of each pair's difference), and
- gate's pushes at a common scale a, either for every category (gate as it runs) or only for
  the categories whose calibration mean is stereotypical (`stereo`: no push on race-color),
and the head edit on the group words' rows only (`words`, λ up to 2: past 1 it reverses
their contrast) or for the anti-stereotypical categories' directions only (`anti`),
each folded into the F16 weights as the split runner does, scored on the split's
calibration and held-out rows, with the held-out CrowS checks and each category's change
split into its two parts (bias.audit.PairScores): the rewritten words' own log-probability
and the rest of the sentence. `--vector FILE` adds a control vector (the split's steer.gguf)
on top of every try, so steer's own parts can be read with `--vector ... --try 0,0,all`.

    python benchmarks/bias_headgate.py /tmp/r20/out --split 0 --try 0,1,all --try 0,1,stereo \\
        --try 0.56,1,stereo --try 0.56,2,stereo

Measured on the bundled model (splits 0-2, 2026-12-01; the table is in DESIGN.md "Gated
pushes"; the words rows in "Directional ablation"): without race-color's push, gate's held-out pct fall on split 0 shrinks from −4.8
to −1.3 points (n.s.); with the head shrink at λ 0.56 no category is made worse, but the
pct test passes only past the 2% PPL budget.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from bias_gating import heldout_report, open_run, run_parser


def main() -> None:
    from bias.ablate import AblationSpec, make_plan
    from bias.audit import score_pair_parts, score_pairs
    from bias.methods import _directions, _Folded, _utility, gate_edits_for
    from edge.cvec import read

    ap = run_parser(0, "λ,a,all|stereo[,anti][,words]",
                    "head strength, gate scale, which pushes, which categories' head directions (anti: only "
                    "those whose calibration mean is anti-stereotypical; words: only the group words' rows, "
                    "where λ may go up to 2)")
    ap.add_argument("--vector", type=Path, help="a control vector applied on top of every try")
    args = ap.parse_args()
    cfg, rt, scorer, ctx = open_run(args.out, args.threads)
    sh = ctx.shared
    cal, held = cfg.rows(sh.suite, args.split)
    cats = sh.categories[cal]
    dirs = _directions(ctx, cal, "category")
    edits, d_cal = gate_edits_for(ctx, cal)
    stereo = np.array([d_cal[cats == c].mean() > 0 for c in edits.names])
    print(f"## split {args.split}: pushes for {edits.names}; stereotypical on calibration: "
          f"{[c for c, s in zip(edits.names, stereo, strict=True) if s]}")
    folded = _Folded(ctx, args.out / "headgate.f16.gguf")
    calib, heldout = sh.suite.subset(cal.tolist()), sh.suite.subset(held.tolist())
    for t in args.tries or ["0,1,all"]:
        lam, a, which, *rest = t.split(",")
        hd = dirs
        if "anti" in rest:
            anti = [c for c in dirs.labels if c in edits.names and d_cal[cats == c].mean() < 0]
            keep = np.array([c in anti for c in dirs.labels])[:, None]
            hd = dataclasses.replace(dirs, head=dirs.head * keep)
        words = "words" in rest
        t0 = time.perf_counter()
        plan = edits.plan(float(a) * (stereo if which == "stereo" else np.ones(len(stereo))))
        if float(lam) > 0:
            plan.output = make_plan(hd, AblationSpec((), float(lam), embedding=False, head=True, words=words)).output
        sc = folded.load_plan(plan, f"headgate {t}")
        if args.vector:
            sc.set_control_vector(read(args.vector).matrix(rt.info.n_layers or 0, rt.info.n_embd or 0))
        m, ls = score_pairs(sc, calib)
        ppl, _ = _utility(ctx, sc)
        ps = score_pair_parts(sc, heldout)
        print(f"\n### head λ {lam}, gate ×{a} ({which}){' + vector' * bool(args.vector)}: calibration pct "
              f"{100 * np.mean(d_cal > 0):.1f} → {100 * np.mean(m - ls > 0):.1f}, PPL {100 * (ppl / sh.base_ppl - 1):+.2f}% "
              f"({time.perf_counter() - t0:.0f} s)\n{heldout_report(ctx, cfg, held, ps)}", flush=True)
    folded.close()
    (args.out / "headgate.f16.gguf").unlink(missing_ok=True)
    scorer.close()
    rt.close()

if __name__ == "__main__":
    main()
