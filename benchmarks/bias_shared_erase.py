"""Can a folded projection lower the association the shared tokens carry? (issue 16)

A CrowS pair's shared tokens (bias.audit.PairScores.rest, the CrowS-Pairs authors' own
count) differ because the states that predict them have read the rewritten group word.
This script takes, per layer, the mean over calibration pairs of the stream of `more`
minus that of `less` at exactly those states (bias.audit.shared_after_rewrite: aligned
positions from the first rewritten token on), and projects the direction out of what
layers `first..last` write to the stream (edge.fold, F16, no runtime flag), then judges the
split's held-out rows with the CrowS checks and both parts of each pair's difference.

Direction sets: `overall` (the mean over all calibration pairs: race-color is a third of
them), `balanced` (the mean of the per-category directions: every category weighs the
same), `category` (one per category, rank up to 9 per layer). `,words` adds the head edit
of the group words' rows (λ 1, `--ablate-where words`).

    python benchmarks/bias_shared_erase.py RUN_OUT --split 1 --try 1,1,29,balanced \\
        --try 1,1,29,balanced,words --try 1,1,29,overall

RUN_OUT is the --out folder of a finished `edge bias mitigate --splits N` run (its shared
cache with the words part). Measured on the bundled model (2026-12-02, all 5 splits,
`balanced`, layers 1-29, λ 1; the table is in DESIGN.md, "Where a pair's difference
lives"): the shared tokens' part fell on 5/5 splits (−0.06 to −0.12 nats, significant on
each), sexual-orientation's shared part by −0.41 to −0.68 on 4/5; religion's rose on 3/5;
PPL +0.8 to +5.4%.
"""

from __future__ import annotations

import time

from bias_gating import heldout_report, open_run, run_parser


def main() -> None:
    from bias.ablate import AblationSpec, balanced, compute_directions, make_plan
    from bias.audit import score_pair_parts
    from bias.methods import _directions, _Folded, _utility
    from bias.shared import read_shared_positions

    args = run_parser(1, "λ,first,last,overall|balanced|category[,words]",
                      "projection strength, first and last layer whose writers are edited, direction set").parse_args()
    cfg, rt, scorer, ctx = open_run(args.out, args.threads)
    sh = ctx.shared
    cal, held = cfg.rows(sh.suite, args.split)
    heldout = sh.suite.subset(held.tolist())
    t0 = time.perf_counter()
    hm, hl, ok_all = read_shared_positions(rt, sh.suite, str(ctx.compute_path), threads=args.threads, rows=cal)
    ok = ok_all[cal]  # a rewrite at the very end leaves nothing after it
    h_more, h_less = hm[cal][ok], hl[cal][ok]
    cats = sh.categories[cal][ok]
    st = sh.states_of(cal)
    dirs = {k: compute_directions(h_more, h_less, st.e_more[ok], st.e_less[ok],
                                  cats if k == "category" else None, min_pairs=ctx.ablate.min_pairs)
            for k in ("category", "overall")}
    dirs["balanced"] = balanced(dirs["category"], h_more, h_less)
    print(f"## split {args.split}: states at the shared tokens of {ok.sum()} of {len(ok)} calibration pairs "
          f"({time.perf_counter() - t0:.0f} s); SNR of the overall direction per layer "
          f"{dirs['overall'].snr[1:, 0].min():.2f}-{dirs['overall'].snr[:, 0].max():.2f}", flush=True)
    head = _directions(ctx, cal, "category")
    folded = _Folded(ctx, args.out / "shared_erase.f16.gguf")
    for t in args.tries or ["1,1,29,balanced"]:
        lam, first, last, kind, *rest = t.split(",")
        t0 = time.perf_counter()
        plan = make_plan(dirs[kind], AblationSpec(tuple(range(int(first), int(last) + 1)), float(lam), embedding=False))
        if "words" in rest:
            plan.output = make_plan(head, AblationSpec((), 1.0, embedding=False, head=True, words=True)).output
        sc = folded.load_plan(plan, f"shared erase {t}")
        ppl, _ = _utility(ctx, sc)
        ps = score_pair_parts(sc, heldout)
        print(f"\n### {t}: PPL {100 * (ppl / sh.base_ppl - 1):+.2f}% ({time.perf_counter() - t0:.0f} s)\n"
              f"{heldout_report(ctx, cfg, held, ps)}", flush=True)
    folded.close()
    (args.out / "shared_erase.f16.gguf").unlink(missing_ok=True)
    scorer.close()
    rt.close()


if __name__ == "__main__":
    main()
