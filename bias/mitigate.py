"""`edge bias mitigate`: directions → feedback loop → control vector → held-out judgement."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bias import metrics as M
from bias.audit import open_scorer, score_bbq, score_pairs, score_suite, summarize
from bias.cvec import write
from bias.feedback import LoopConfig, Utility, neutral_chunks, run_loop, split
from bias.steering import compute_directions, pair_states
from bias.suites import load_suite
from edge import telemetry
from edge.errors import BadOptionError
from edge.generate import load_runtime, runtime_config_record
from edge.paths import atomic_write
from edge.runtime import RuntimeConfig

Event = Callable[[str, dict[str, Any]], None]


def _pair_judgement(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                    n_boot: int) -> dict[str, Any]:
    arrays = [*before, *after]
    return {
        "before": {"pct_stereotype": M.bootstrap(M.pct_stereotype, before, n_boot=n_boot).to_dict(),
                   "mean_ll_diff": M.bootstrap(M.mean_ll_diff, before, n_boot=n_boot).to_dict()},
        "after": {"pct_stereotype": M.bootstrap(M.pct_stereotype, after, n_boot=n_boot).to_dict(),
                  "mean_ll_diff": M.bootstrap(M.mean_ll_diff, after, n_boot=n_boot).to_dict()},
        # paired bootstrap of the fall in each magnitude: significant when lo > 0
        "gap_reduction": M.bootstrap(M.reduction(M.stereotype_gap, M.stereotype_gap), arrays,
                                     n_boot=n_boot).to_dict(),
        "mean_ll_diff_reduction": M.bootstrap(M.reduction(M.mean_ll_diff, M.mean_ll_diff), arrays,
                                              n_boot=n_boot).to_dict(),
        # paired bootstrap of the change itself (after − before): the ratios above have a
        # near-zero denominator in some resamples, so their CIs say little about significance
        "gap_change": M.bootstrap(M.difference(M.stereotype_gap), arrays, n_boot=n_boot).to_dict(),
        "mean_ll_diff_change": M.bootstrap(M.difference(M.mean_ll_diff), arrays, n_boot=n_boot).to_dict(),
    }


def mitigate(model: str | None, suite_spec: str, out_path: str, *, cfg: LoopConfig | None = None,
             n_direction_pairs: int = 64, method: str = "mean", heldout_limit: int | None = None,
             calib_limit: int | None = None,
             second_suite: str | None = "probes", bbq_spec: str | None = None, bbq_limit: int = 150,
             out_dir: str | None = None, threads: int | None = None, precision: str = "auto",
             n_boot: int = 1000,
             on_event: Event | None = None) -> dict[str, Any]:
    from edge.engine import Engine

    cfg = cfg or LoopConfig()
    cfg.validate()
    emit = on_event or (lambda kind, data: None)
    suite = load_suite(suite_spec)
    if suite.kind != "pairs":
        raise BadOptionError("mitigate needs a pair suite (crows_pairs or probes) for --suite")
    t0 = time.perf_counter()
    cal_idx, held_idx = split(suite, cfg.calib_frac, cfg.seed, cfg.exclude_category)
    if heldout_limit:
        rng = np.random.default_rng(cfg.seed + 1)
        held_idx = sorted(rng.choice(held_idx, min(heldout_limit, len(held_idx)), replace=False).tolist())
    if calib_limit:
        cal_idx = sorted(np.random.default_rng(cfg.seed + 2).choice(
            cal_idx, min(calib_limit, len(cal_idx)), replace=False).tolist())
    calib, held = suite.subset(cal_idx), suite.subset(held_idx)
    rt = load_runtime(model, RuntimeConfig(n_ctx=512, threads=threads))
    scorer = None
    try:
        scorer = open_scorer(rt, precision)
        engine = Engine.from_gguf(rt.path)
        emit("stage", {"stage": "directions", "pairs": min(n_direction_pairs, len(calib.items))})
        h_more, h_less = pair_states(engine, calib.items[:n_direction_pairs])
        dirs = compute_directions(h_more, h_less, method)
        neutral = neutral_chunks(rt)
        emit("stage", {"stage": "loop", "calibration_pairs": len(calib.items)})
        loop = run_loop(scorer, calib, dirs, cfg, neutral, on_event)
        vec = dirs.vectors * loop.coefficients[:, None].astype(np.float32)
        write(out_path, vec, model_hint=rt.info.arch or "llama", coefficients=loop.coefficients,
              source=f"edge bias mitigate {suite.name} seed {cfg.seed}")

        def both(fn: Callable[[], Any]) -> tuple[Any, Any]:
            scorer.set_control_vector(None)
            b = fn()
            scorer.set_control_vector(vec)
            a = fn()
            scorer.set_control_vector(None)
            return b, a

        emit("stage", {"stage": "held-out", "pairs": len(held.items)})
        hb, ha = both(lambda: score_pairs(scorer, held))
        out: dict[str, Any] = {
            "suite": suite.name, "source": suite.source, "config": asdict(cfg),
            "direction_pairs": dirs.n_pairs, "method": method, "vector": str(out_path),
            "compute": scorer.record(),
            "calibration_rows": [suite.items[i].row for i in cal_idx],
            "heldout_rows": [suite.items[i].row for i in held_idx],
            "loop": loop.to_dict(), "heldout": _pair_judgement(hb, ha, n_boot),
        }
        h = out["heldout"]
        h["significant"] = {"gap": h["gap_change"]["hi"] < 0, "mean_ll_diff": h["mean_ll_diff_change"]["hi"] < 0}
        cats = np.array([it.category for it in held.items])
        out["heldout_per_category"] = {
            c: _pair_judgement((hb[0][cats == c], hb[1][cats == c]), (ha[0][cats == c], ha[1][cats == c]),
                               n_boot) for c in sorted(set(cats.tolist()))}
        if cfg.exclude_category in out["heldout_per_category"]:
            x = out["heldout_per_category"][cfg.exclude_category]
            out["excluded_category"] = {"name": cfg.exclude_category,
                                        "worse_beyond_ci": x["gap_change"]["lo"] > 0,
                                        "gap_change": x["gap_change"]}
        utility = Utility(scorer, neutral)
        (ppl_b, _), (ppl_a, kl) = both(utility)
        out["ppl"] = {"before": ppl_b, "after": ppl_a, "increase": ppl_a / ppl_b - 1,
                      "tokens": sum(len(c) for c in neutral), "kl": kl}
        if bbq_spec:
            bbq = load_suite(bbq_spec)
            dis = bbq.subset([i for i, it in enumerate(bbq.items) if not it.ambiguous][:bbq_limit])
            bb, ba = both(lambda: score_bbq(scorer, dis))
            acc = [float(np.mean(x.argmax(1) == np.array([it.label for it in dis.items]))) for x in (bb, ba)]
            out["bbq_dis_accuracy"] = {"before": acc[0], "after": acc[1], "drop_points": 100 * (acc[0] - acc[1]),
                                       "n": len(dis.items)}
        if second_suite:
            s2 = load_suite(second_suite)
            sb, sa = both(lambda: score_suite(scorer, s2))
            out["second_suite"] = {"suite": s2.name, "before": {k: e.to_dict() for k, e in summarize(s2, sb, n_boot)[0].items()},
                                   "after": {k: e.to_dict() for k, e in summarize(s2, sa, n_boot)[0].items()}}
        out["elapsed_s"] = time.perf_counter() - t0
        if out_dir:
            d = Path(out_dir)
            d.mkdir(parents=True, exist_ok=True)
            with atomic_write(d / "results.json", "w") as f:
                json.dump(out, f, indent=1)
            with atomic_write(d / "report.md", "w") as f:
                f.write(report_md(out))
        telemetry.log("fairness", {"command": "bias mitigate", "suite": suite.name,
                                   "heldout": out["heldout"], "ppl": out["ppl"],
                                   "bbq_dis_accuracy": out.get("bbq_dis_accuracy")},
                      model=rt.info, config=runtime_config_record(rt, correction=str(out_path),
                                                                   compute=out["compute"]))
        return out
    finally:
        if scorer is not None:
            scorer.close()
        rt.close()


def report_md(r: dict[str, Any]) -> str:
    h = r["heldout"]

    def e(x: dict[str, float]) -> str:
        return f"{x['value']:.3g} [{x['lo']:.3g}, {x['hi']:.3g}]"

    lines = [f"# Bias mitigation: {r['suite']}", "",
             f"Vector: `{r['vector']}`; {len(r['calibration_rows'])} calibration rows, "
             f"{len(r['heldout_rows'])} held-out rows (listed in results.json).", "",
             "| held-out | before | after | fall (paired bootstrap) |", "|---|---|---|---|",
             f"| pct_stereotype | {e(h['before']['pct_stereotype'])} | {e(h['after']['pct_stereotype'])} | "
             f"{e(h['gap_reduction'])} of \\|pct−50\\| |",
             f"| mean ll diff | {e(h['before']['mean_ll_diff'])} | {e(h['after']['mean_ll_diff'])} | "
             f"{e(h['mean_ll_diff_reduction'])} |", "",
             f"Paired change (after − before): \\|pct−50\\| {e(h['gap_change'])} points, mean ll diff "
             f"{e(h['mean_ll_diff_change'])} nats; significant (CI below 0): "
             f"{h['significant']['gap']} and {h['significant']['mean_ll_diff']}.", "",
             f"PPL on neutral text: {r['ppl']['before']:.3f} → {r['ppl']['after']:.3f} "
             f"({100 * r['ppl']['increase']:+.2f}%), mean KL {r['ppl']['kl']:.4f} nats/token."]
    if "excluded_category" in r:
        x = r["excluded_category"]
        lines.append(f"Category never used in the loop ({x['name']}): change of \\|pct−50\\| "
                     f"{e(x['gap_change'])} points; worse beyond its CI: {x['worse_beyond_ci']}.")
    if "bbq_dis_accuracy" in r:
        b = r["bbq_dis_accuracy"]
        lines.append(f"BBQ disambiguated accuracy ({b['n']} items): {100 * b['before']:.1f}% → "
                     f"{100 * b['after']:.1f}%.")
    lines += ["", "## Loop (calibration rows)", "",
              "| i | phase | gain | pct | mean ll diff | PPL | ΔPPL | KL | within budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for it in r["loop"]["iterations"]:
        lines.append(f"| {it['i']} | {it['phase']} | {it['gain']:.3f} | {it['pct_stereotype']:.1f} | "
                     f"{it['mean_ll_diff']:.3f} | {it['ppl']:.3f} | {100 * it['ppl_increase']:+.2f}% | "
                     f"{it['kl']:.4f} | {it['feasible']} |")
    if r["loop"].get("weights"):
        w = r["loop"]["coefficients"]
        lines += ["", "Per-layer coefficients (layer 1 on): " + ", ".join(f"{c:.2f}" for c in w[1:])]
    return "\n".join(lines) + "\n"
