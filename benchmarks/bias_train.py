"""Try settings of the learned edit (`edge bias mitigate --method learn`, bias.learn) on one
split of a finished `--splits` run, without redoing the run's shared work.

Each --try is rank,beta,steps[,rounds[,swaps]][,key=value...]: the first round's β and Adam
steps, how many rounds the budget loop may run (1: a fixed fit, as the first measurements
were made), how many counterfactual pairs (bias.swap) each training pair adds, and any other
LearnConfig field by name (e.g. objective=means). The
fit is folded, scored by llama.cpp on the split's held-out rows and judged with the split
runner's checks (each pair's difference before and after saved in the try's folder,
heldout_pairs.npz); `--bbq` also judges the run's BBQ items (in torch when the run judged it there: ~2.5 min to read 500 a condition).

    pip install 'edge[learn]'
    python benchmarks/bias_train.py /tmp/r40/out --split 0 --try 4,1.0,200,1 --try 4,1.0,200,1,objective=means

The first measurements (DESIGN.md "A learned edit") were made with an earlier version of this
script that trained on every calibration pair (no validation pairs held back) for a fixed
200 steps at β 1; the library's fit holds a fifth back to pick the step and the round.
"""

from __future__ import annotations

import time

import numpy as np
from bias_gating import heldout_report, open_run, run_parser


def _value(current: object, text: str) -> object:
    """A LearnConfig field's value from text, typed like its current value (an unset one,
    such as first_layer, as a number)."""
    if current is None:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    return type(current)(text)


def main() -> None:
    from dataclasses import replace

    from bias.judge import judge_bbq
    from bias.methods import fit_learn

    ap = run_parser(0, "rank,beta,steps[,rounds[,swaps]][,key=value...]",
                    "the edit's rank, the first round's β and steps, the rounds, counterfactual pairs per pair, "
                    "other LearnConfig fields")
    ap.add_argument("--bbq", action="store_true", help="also judge the run's BBQ items (in torch when the run judged it there: ~2.5 min to read 500 a condition)")
    ap.add_argument("--calib-frac", type=float, help="split at this calibration share instead of the run's "
                    "(its cached scores cover every row; its pair states are not read by learn)")
    args = ap.parse_args()
    cfg, rt, scorer, ctx = open_run(args.out, args.threads)
    if args.calib_frac is not None:
        cfg = ctx.cfg = replace(cfg, calib_frac=args.calib_frac)
    ctx.emit = lambda kind, d: print(f"  {kind}: " + "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()
        if isinstance(v, (int, float, str))), flush=True) if kind != "learn_step" else None
    sh = ctx.shared
    if not args.bbq:  # nor read BBQ's answer rows (~2.5 min at 500 a condition)
        sh.bbq = None
    cal, held = cfg.rows(sh.suite, args.split)
    heldout = sh.suite.subset(held.tolist())
    base = ctx.learn  # each try starts from the run's settings, not the previous try's
    for i, tr in enumerate(args.tries or ["4,1.0,200"]):
        f = [x for x in tr.split(",") if "=" not in x]
        named = dict(x.split("=", 1) for x in tr.split(",") if "=" in x)
        ctx.learn = replace(base, rank=int(f[0]), beta=float(f[1]), steps=int(f[2]),
                            rounds=int(f[3]) if len(f) > 3 else base.rounds,
                            swaps=int(f[4]) if len(f) > 4 else base.swaps,
                            **{k: _value(getattr(base, k), v) for k, v in named.items()})
        work = args.out / f"train_split{args.split}_{i}"
        work.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        corr = fit_learn(ctx, cal, work, 1)  # index ≥ 1: no -o file, no deployed copy
        try:
            fit = corr.fit
            if corr.is_identity:
                print(f"\n### {tr}: no round within the budget", flush=True)
                continue
            ps = corr.score_pairs(heldout)
            ppl, _ = corr.utility()
            # the held-out pairs and PPL before, from the engine the correction is judged in
            bp = corr.before_pairs(heldout) if corr.before_pairs is not None else None
            bd = (bp.more - bp.less) if bp is not None else sh.base[0][held] - sh.base[1][held]
            base_ppl = sh.base_ppl if corr.base_ppl is None else corr.base_ppl
            # each held-out pair's difference before and after, to set two fits side by side
            np.savez(work / "heldout_pairs.npz", rows=held, before=bd, after=ps.more - ps.less,
                     categories=sh.categories[held])
            print(f"\n### {tr} ({time.perf_counter() - t0:.0f} s): round {fit['chosen']} of {len(fit['rounds'])}, "
                  f"PPL {100 * (ppl / base_ppl - 1):+.2f}% ({corr.engine}), torch vs llama.cpp {fit['agreement']:.3f} "
                  f"nats; held-out mean d² {np.mean(bd ** 2):.2f} → "
                  f"{np.mean((ps.more - ps.less) ** 2):.2f}; {fit['swapped_pairs']} swapped pairs; rounds (β: PPL, "
                  f"train / val d²) " + ", ".join(f"{r['beta']:.3g}: {100 * r['ppl_increase']:+.2f}%, "
                                                 f"{r['train_d2']:.3f} / {r['val_d2']:.3f}" for r in fit["rounds"])
                  + f"\n{heldout_report(ctx, cfg, held, ps, bp)}", flush=True)
            bbq_before = sh.bbq_base if corr.before_bbq is None or sh.bbq is None else corr.before_bbq(sh.bbq)
            if args.bbq and sh.bbq is not None and bbq_before is not None:
                bj = judge_bbq(sh.bbq_flags(bbq_before), sh.bbq_flags(corr.score_bbq(sh.bbq)))
                x, y = bj["acc_dis"].change, bj["s_amb"]
                print(f"BBQ ({len(sh.bbq.items)} items): disambiguated accuracy change {100 * x.value:+.2f} "
                      f"[{100 * x.lo:+.2f}, {100 * x.hi:+.2f}] points; s_AMB {y.before.value:+.3f} → "
                      f"{y.after.value:+.3f}", flush=True)
        finally:
            corr.close()
    scorer.close()
    rt.close()


if __name__ == "__main__":
    main()
