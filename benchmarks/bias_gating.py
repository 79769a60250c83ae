"""Would gating a correction by category pass issue 16's category checks? Two answers from a
finished `edge bias mitigate --method both --splits N` run (its --out directory):

1. Oracle gate on measured scores: each held-out pair takes the after-score of the method
   its category's *calibration* mean chose (steer where it is > 0; ablate, or nothing,
   where it is < 0). No new scoring: the scores are those the run measured.
2. Per-category steering on one split: a control vector per category from that category's
   calibration pairs (states from the run's shared.npz), its gain fitted on them by secant
   steps toward a James-Stein-shrunken target (the part of the calibration mean its standard
   error vouches for), applied to that category's held-out pairs only; plus the PPL rise on
   neutral text each vector would cost if the gate fired there.

    python benchmarks/bias_gating.py /tmp/r17/out [--split 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUITE = f"crows_pairs:{DATA}/crows_pairs/crows_pairs_anonymized.csv"


def suite_of(run: dict[str, Any]) -> str:
    """The run's own CrowS file (its row indices are that file's), else ../shared's."""
    src = run.get("shared", {}).get("suite")
    return f"crows_pairs:{src}" if src and Path(src).is_file() else SUITE


CROWS_CHECKS = ("ci_contains_50_after_excluded_before", "paired_change_significant",
                "no_category_made_worse", "biased_categories_moved")


def checks(judged: Any, exclude: str | None) -> tuple[str, dict[str, Any]]:
    """The split runner's own CrowS checks (bias.splits.CHECKS) on a judged combination."""
    from bias.splits import CHECKS

    p = judged.pct
    record = {"heldout": judged.to_dict(), "categories": judged.category_moves(exclude=exclude)}
    line = (f"pct {p.before.value:.1f} -> {p.after.value:.1f} [{p.after.lo:.1f}, {p.after.hi:.1f}], "
            f"change {p.change.value:+.1f} [{p.change.lo:+.1f}, {p.change.hi:+.1f}]")
    return line, {**{k: CHECKS[k](record) for k in CROWS_CHECKS}, "moves": record["categories"]}


def category_lines(judged: Any) -> str:
    """Each category's mean ll difference before → after, and the change's CI."""
    out = []
    for c, d in judged.per_category.items():
        x = d["mean_ll_diff"]
        out.append(f"  {c:20s} {x.before.value:+.2f} [{x.before.lo:+.2f}, {x.before.hi:+.2f}] → {x.after.value:+.2f}, "
                   f"change {x.change.value:+.2f} [{x.change.lo:+.2f}, {x.change.hi:+.2f}]")
    return "\n".join(out)


def run_parser(split: int, try_metavar: str, try_help: str) -> argparse.ArgumentParser:
    """The arguments of a script that tries edits on one split of a finished run: the run's
    --out folder, --split, --try (repeatable), --threads."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path, help="the --out folder of a finished mitigate --splits run")
    ap.add_argument("--split", type=int, default=split)
    ap.add_argument("--try", dest="tries", action="append", metavar=try_metavar, help=f"{try_help} (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def open_run(out: Path, threads: int) -> tuple[Any, Any, Any, Any]:
    """(SplitsConfig, runtime, scorer, context) of a finished `edge bias mitigate --splits`
    run, with the run's own settings so that the shared work cached in `out` is reused."""
    from bias.ablate import AblateConfig
    from bias.audit import open_scorer
    from bias.gate import GateConfig
    from bias.learn import LearnConfig
    from bias.methods import bbq_engine, open_context
    from bias.splits import SplitsConfig
    from bias.suites import load_suite
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    run = json.loads((out / "results.json").read_text())

    def tuples(d: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    cfg = SplitsConfig(**tuples(run["config"]))
    rt = open_runtime(None, RuntimeConfig(n_ctx=512, threads=threads))
    scorer = open_scorer(rt, "auto")
    learn = LearnConfig(**tuples(run["shared"].get("learn_config", {})))
    # a run that judged BBQ in torch cached no llama.cpp BBQ scores: nor does its reopening
    torch_bbq = bbq_engine(cfg.methods, learn, rt.info.n_layers or 0) == "torch"
    ctx = open_context(rt, scorer, load_suite(f"crows_pairs:{run['shared']['suite']}"), out, cfg,
                       AblateConfig(), GateConfig(**tuples(run["shared"].get("gate_config", {}))), lambda k, d: None,
                       bbq_scored=not torch_bbq)
    ctx.learn = learn
    return cfg, rt, scorer, ctx


def heldout_report(ctx: Any, cfg: Any, held: np.ndarray, ps: Any, before: Any = None) -> str:
    """A try's held-out judgement (bias.audit.PairScores `ps` of the split's held-out rows):
    the CrowS checks, each category's change, and both parts when the cache has the words'.
    `before`: the uncorrected PairScores from the correction's own engine (learn's torch)."""
    from bias.judge import judge_pair_rows, judge_parts

    sh = ctx.shared
    b, cats = (sh.base[0][held], sh.base[1][held]), sh.categories[held].tolist()
    if before is not None:
        b = (before.more, before.less)
        judged = judge_pair_rows(b, (ps.more, ps.less), cats)
        line, passed = checks(judged, cfg.exclude_category)
        return (f"held-out: {line}\n{passed}\n{category_lines(judged)}\n"
                + parts_lines(judge_parts((b[0] - b[1], ps.more - ps.less), (before.words, ps.words), cats)))
    judged = judge_pair_rows(b, (ps.more, ps.less), cats)
    line, passed = checks(judged, cfg.exclude_category)
    out = f"held-out: {line}\n{passed}\n{category_lines(judged)}"
    if sh.base_words is not None:
        out += "\n" + parts_lines(judge_parts((b[0] - b[1], ps.more - ps.less), (sh.base_words[held], ps.words), cats))
    return out


def parts_lines(parts: dict[str, Any]) -> str:
    """bias.judge.judge_parts per category: the rewritten tokens' part, the shared tokens'
    part (change and CI) and the pct on the shared tokens (after, CI, change)."""
    return "parts: rewritten tokens; shared tokens (change [CI]); pct on the shared tokens [CI after], change [CI]\n" + \
        "\n".join(f"  {c:20s} {w.before.value:+.2f} → {w.after.value:+.2f}; {r.before.value:+.2f} → {r.after.value:+.2f} "
                  f"({r.change.value:+.2f} [{r.change.lo:+.2f}, {r.change.hi:+.2f}]); "
                  f"{q.before.value:.1f} → {q.after.value:.1f} [{q.after.lo:.1f}, {q.after.hi:.1f}], "
                  f"change {q.change.value:+.1f} [{q.change.lo:+.1f}, {q.change.hi:+.1f}]"
                  for (c, w), r, q in zip(parts["words"].items(), parts["rest"].values(), parts["rest_pct"].values(),
                                          strict=True))


def oracle(run: dict[str, Any], more: np.ndarray, less: np.ndarray, cats: np.ndarray, exclude: str | None) -> None:
    from bias.judge import judge_pair_rows

    for negative in ("ablate", "none"):
        tally: dict[str, int] = {}
        print(f"\n## Oracle gate: steer where the calibration mean > 0, {negative} where < 0")
        for sp in run["splits"]:
            m = sp["methods"]
            if not {"steer", "ablate"} <= set(m):
                continue
            cal, held = np.array(sp["calibration_rows"]), np.array(sp["heldout_rows"])
            hc = cats[held]
            am = np.array(m["steer"]["heldout_scores"]["ll_more"])
            al = np.array(m["steer"]["heldout_scores"]["ll_less"])
            for c in set(hc.tolist()):
                in_cal = cats[cal] == c
                if in_cal.any() and float(np.mean(more[cal][in_cal] - less[cal][in_cal])) < 0:
                    sel = hc == c
                    if negative == "ablate":
                        am[sel] = np.array(m["ablate"]["heldout_scores"]["ll_more"])[sel]
                        al[sel] = np.array(m["ablate"]["heldout_scores"]["ll_less"])[sel]
                    else:
                        am[sel], al[sel] = more[held][sel], less[held][sel]
            line, ok = checks(judge_pair_rows((more[held], less[held]), (am, al), hc.tolist()), exclude)
            print(f"seed {sp['seed']}: {line}; moved {ok['moves']['moved_toward_neutral']} of "
                  f"{ok['moves']['biased_before']}, worse {ok['moves']['made_worse']}")
            for k, v in ok.items():
                if k != "moves":
                    tally[k] = tally.get(k, 0) + int(v)
        print("splits passing:", tally)


def per_category(run: dict[str, Any], out: Path, split: int, threads: int, exclude: str | None) -> None:
    from bias.audit import open_scorer, score_pairs
    from bias.feedback import Utility, layer_weights, neutral_chunks
    from bias.judge import judge_pair_rows
    from bias.steering import compute_directions
    from bias.suites import load_suite
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    sp = run["splits"][split]
    z = np.load(out / "shared.npz")
    suite = load_suite(suite_of(run))
    cats = np.array([it.category for it in suite.items])
    more, less = z["more"], z["less"]
    cal, held = np.array(sp["calibration_rows"]), np.array(sp["heldout_rows"])
    rt = open_runtime(None, RuntimeConfig(n_ctx=512, threads=threads))
    sc = open_scorer(rt, "auto")
    util = Utility(sc, neutral_chunks(rt))
    base_ppl, _ = util()
    am, al = more[held].copy(), less[held].copy()
    print(f"\n## Per-category steering, split {split} (seed {sp['seed']})")
    for c in sorted(set(cats[cal].tolist())):
        rows = cal[cats[cal] == c]
        d = more[rows] - less[rows]
        m, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
        keep = max(0.0, 1 - (se / m) ** 2) if m else 0.0  # James-Stein: the share of m to remove
        if keep == 0:
            print(f"{c:20s} calibration n={len(rows):3d} mean {m:+.2f} ± {se:.2f}: indistinguishable from 0, left alone")
            continue
        target = m * (1 - keep)
        dirs = compute_directions(z["h_more"][rows], z["h_less"][rows], "mean")
        w = layer_weights(dirs)
        sub = suite.subset(rows.tolist())

        def apply(g: float, dirs: Any = dirs, w: np.ndarray = w) -> None:
            sc.set_control_vector(dirs.vectors * (g * w)[:, None].astype(np.float32))

        def measure(g: float, sub: Any = sub) -> float:
            apply(g)
            mm, ll = score_pairs(sc, sub)
            return float(np.mean(mm - ll))

        g_prev, v_prev, g = 0.0, m, -0.3 * float(np.sign(m))
        for _ in range(4):  # secant steps toward the target
            v = measure(g)
            if abs(v - target) < 0.05 * abs(m) or v == v_prev:
                break
            g_prev, v_prev, g = g, v, float(np.clip(g + (target - v) * (g - g_prev) / (v - v_prev), -3, 3))
        v = measure(g)
        ppl, _ = util()
        sel = cats[held] == c
        am[sel], al[sel] = score_pairs(sc, suite.subset(held[sel].tolist()))
        sc.set_control_vector(None)
        print(f"{c:20s} calibration n={len(rows):3d} mean {m:+.2f} ± {se:.2f} → {v:+.2f} (gain {g:+.2f}); "
              f"held-out {np.mean(d_h := more[held][sel] - less[held][sel]):+.2f} (n={len(d_h)}) → "
              f"{np.mean(am[sel] - al[sel]):+.2f}; PPL if the gate fired on neutral text {100 * (ppl / base_ppl - 1):+.1f}%",
              flush=True)
    judged = judge_pair_rows((more[held], less[held]), (am, al), cats[held].tolist())
    line, ok = checks(judged, exclude)
    print(line)
    print(ok["moves"])
    print(category_lines(judged))
    sc.close()
    rt.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path, help="the --out directory of a finished mitigate --splits run")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-steering", action="store_true", help="the oracle table only (no scoring)")
    args = ap.parse_args()
    from bias.suites import load_suite

    run = json.loads((args.out / "results.json").read_text())
    exclude = run["config"].get("exclude_category")
    z = np.load(args.out / "shared.npz")
    cats = np.array([it.category for it in load_suite(suite_of(run)).items])
    if len(cats) != len(z["more"]):
        raise SystemExit(f"{args.out}: its scores cover {len(z['more'])} rows but the suite has {len(cats)}")
    oracle(run, z["more"], z["less"], cats, exclude)
    if not args.skip_steering:
        per_category(run, args.out, args.split, args.threads, exclude)


if __name__ == "__main__":
    main()
