"""`edge bias mitigate`: directions → feedback loop → control vector → held-out judgement."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bias import metrics as M
from bias.audit import open_scorer, score_bbq, score_pairs, score_suite, summarize
from bias.feedback import (
    NOTHING_KEPT,
    LoopConfig,
    LoopResult,
    Utility,
    calib_count,
    run_loop,
    split,
    utility_chunks,
)
from bias.splits_report import report_html
from bias.steering import compute_directions, pair_states
from bias.suites import Suite, load_suite
from edge import telemetry
from edge.cvec import write
from edge.errors import BadOptionError
from edge.paths import atomic_write
from edge.runtime import RuntimeConfig
from edge.session import open_runtime

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class PairJudgement:
    """Before/after figures of a pair suite's rows, with paired-bootstrap changes."""

    before: dict[str, M.Estimate]  # pct_stereotype, mean_ll_diff
    after: dict[str, M.Estimate]
    gap_reduction: M.Estimate  # fall of |pct − 50| as a share of before
    mean_ll_diff_reduction: M.Estimate
    # paired bootstrap of the change itself (after − before): the ratios above have a
    # near-zero denominator in some resamples, so their CIs say little about significance
    gap_change: M.Estimate
    mean_ll_diff_change: M.Estimate

    @property
    def significant(self) -> dict[str, bool]:
        return {"gap": self.gap_change.hi < 0, "mean_ll_diff": self.mean_ll_diff_change.hi < 0}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: {m: e.to_dict() for m, e in getattr(self, k).items()} for k in ("before", "after")}
        for k in ("gap_reduction", "mean_ll_diff_reduction", "gap_change", "mean_ll_diff_change"):
            d[k] = getattr(self, k).to_dict()
        return d


def judge_pairs(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                n_boot: int) -> PairJudgement:
    arrays = [*before, *after]

    def both(f: M.Stat, arr: tuple[np.ndarray, np.ndarray]) -> M.Estimate:
        return M.bootstrap(f, arr, n_boot=n_boot)

    return PairJudgement(
        before={"pct_stereotype": both(M.pct_stereotype, before), "mean_ll_diff": both(M.mean_ll_diff, before)},
        after={"pct_stereotype": both(M.pct_stereotype, after), "mean_ll_diff": both(M.mean_ll_diff, after)},
        gap_reduction=M.bootstrap(M.reduction(M.stereotype_gap, M.stereotype_gap), arrays, n_boot=n_boot),
        mean_ll_diff_reduction=M.bootstrap(M.reduction(M.mean_ll_diff, M.mean_ll_diff), arrays, n_boot=n_boot),
        gap_change=M.bootstrap(M.difference(M.stereotype_gap), arrays, n_boot=n_boot),
        mean_ll_diff_change=M.bootstrap(M.difference(M.mean_ll_diff), arrays, n_boot=n_boot))


@dataclass
class MitigationResult:
    """What `edge bias mitigate` measured; `to_dict()` is results.json."""

    suite: str
    source: str
    config: dict[str, Any]
    direction_pairs: int
    method: str
    vector: str | None  # None: the loop kept no step and nothing was written
    compute: dict[str, Any]
    calibration_rows: list[int]
    heldout_rows: list[int]
    loop: LoopResult
    heldout: PairJudgement | None = None
    heldout_per_category: dict[str, PairJudgement] = field(default_factory=dict)
    excluded_category: str | None = None  # kept out of the loop, judged in heldout_per_category
    ppl: dict[str, float] = field(default_factory=dict)  # before, after, increase, tokens, kl
    bbq_dis_accuracy: dict[str, float] | None = None  # before, after, drop_points, n
    second_suite: dict[str, Any] | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["loop"] = self.loop.to_dict()
        if self.heldout is not None:
            d["heldout"] = self.heldout.to_dict() | {"significant": self.heldout.significant}
        d["heldout_per_category"] = {c: j.to_dict() for c, j in self.heldout_per_category.items()}
        x = self.heldout_per_category.get(self.excluded_category or "")
        d.pop("excluded_category")
        if x is not None:
            d["excluded_category"] = {"name": self.excluded_category, "worse_beyond_ci": x.gap_change.lo > 0,
                                      "gap_change": x.gap_change.to_dict()}
        for k in ("bbq_dis_accuracy", "second_suite"):
            if d[k] is None:
                d.pop(k)
        return d


def _rows(suite: Any, cfg: LoopConfig, heldout_limit: int | None,
          calib_limit: int | None) -> tuple[list[int], list[int]]:
    """Calibration and held-out item indices: a stratified split, then the optional caps."""
    cal_idx, held_idx = split(suite, cfg.calib_frac, cfg.seed, cfg.exclude_category)
    if heldout_limit:
        rng = np.random.default_rng(cfg.seed + 1)
        held_idx = sorted(rng.choice(held_idx, min(heldout_limit, len(held_idx)), replace=False).tolist())
    if calib_limit:
        cal_idx = sorted(np.random.default_rng(cfg.seed + 2).choice(
            cal_idx, min(calib_limit, len(cal_idx)), replace=False).tolist())
    return cal_idx, held_idx


def load_inputs(suite_spec: str, *, output: str | None, exclude_category: str | None,
                bbq_spec: str | None, calib_frac: float | None = None) -> Suite:
    """The pair suite to calibrate on, after checking every input a run reads or writes, so
    that a typo fails in a second rather than after minutes of scoring."""
    suite = load_suite(suite_spec)
    if suite.kind != "pairs":
        raise BadOptionError("mitigate needs a pair suite (crows_pairs or probes) for --suite")
    cats = sorted({it.category for it in suite.items})
    if exclude_category is not None and exclude_category not in cats:
        raise BadOptionError(f"--exclude-category {exclude_category}: {suite.name} has no such category; "
                             f"use one of {', '.join(cats)}")
    if calib_frac is not None:
        check_split(suite, calib_frac, exclude_category)
    if output is not None:
        _check_output(output)
    if bbq_spec:
        bbq = load_suite(bbq_spec)  # a wrong path or file fails here, with the loader's own message
        if bbq.kind != "bbq":
            raise BadOptionError(f"--bbq {bbq_spec}: not a BBQ suite; use bbq:PATH (a BBQ .jsonl file or folder)")
    return suite


def _check_output(output: str) -> None:
    """-o must be a file name in a folder that exists or can be made (the writers make it, as
    convert's and quantize's do); a path under a file or in a read-only folder fails now."""
    out = Path(output)
    if out.is_dir():
        raise BadOptionError(f"-o {output} is a folder; give a file name, e.g. {out / 'fair.gguf'}")
    folder = out.resolve().parent
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if not nearest.is_dir():
        raise BadOptionError(f"-o {output}: {nearest} is not a folder; choose another -o")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise BadOptionError(f"-o {output}: cannot write in {nearest}; choose a folder you can write to")


NO_VECTOR = f"{NOTHING_KEPT}, so the uncorrected model is what was judged"
MIN_HELD = 10  # held-out pairs a category needs for its CI to mean anything


def check_split(suite: Suite, frac: float, exclude: str | None) -> None:
    """Raise when --calib-frac leaves a category with no calibration pair, or with fewer
    held-out pairs than its judgement needs (min(MIN_HELD, half its pairs)), naming a share that works."""
    counts = Counter(it.category for it in suite.items if it.category != exclude)

    def short(f: float) -> list[tuple[str, int, int, int]]:  # (category, n, calibration, held-out)
        ks = {c: calib_count(f, n) for c, n in sorted(counts.items())}
        return [(c, counts[c], k, counts[c] - k) for c, k in ks.items()
                if k < 1 or counts[c] - k < min(MIN_HELD, counts[c] // 2)]

    bad = short(frac)
    if not bad:
        return
    ok = [f / 100 for f in range(1, 100) if not short(f / 100)]
    c, n, k, h = bad[0]
    what = f"no calibration pair of its {n}" if k < 1 else f"{h} held-out pair{'s' if h != 1 else ''} of {n}"
    fix = f"use {ok[0]:g} to {ok[-1]:g}" if ok else "this suite's categories are too small to split"
    raise BadOptionError(f"--calib-frac {frac:g} leaves {c} {what} (a category needs a calibration pair and "
                         f"{MIN_HELD} held out, or half of a smaller one): {fix}")


def mitigate(model: str | None, suite_spec: str, out_path: str, *, cfg: LoopConfig | None = None,
             n_direction_pairs: int = 64, method: str = "mean", heldout_limit: int | None = None,
             calib_limit: int | None = None,
             second_suite: str | None = "probes", bbq_spec: str | None = None, bbq_limit: int = 150,
             out_dir: str | None = None, threads: int | None = None, precision: str = "auto",
             n_boot: int = 1000,
             on_event: Event | None = None) -> MitigationResult:
    """Directions from calibration pairs → the feedback loop → a control vector at
    `out_path` → judgement on held-out rows (and BBQ, a second suite); results.json and
    report.md in `out_dir`; one `fairness` record."""
    from edge.engine import Engine

    cfg = cfg or LoopConfig()
    cfg.validate()
    emit = on_event or (lambda kind, data: None)
    suite = load_inputs(suite_spec, output=out_path, exclude_category=cfg.exclude_category, bbq_spec=bbq_spec,
                        calib_frac=cfg.calib_frac)
    t0 = time.perf_counter()
    cal_idx, held_idx = _rows(suite, cfg, heldout_limit, calib_limit)
    calib, held = suite.subset(cal_idx), suite.subset(held_idx)
    rt = open_runtime(model, RuntimeConfig(n_ctx=512, threads=threads))
    scorer = None
    try:
        scorer = open_scorer(rt, precision)
        engine = Engine.from_gguf(rt.path)
        emit("stage", {"stage": "directions", "pairs": min(n_direction_pairs, len(calib.items))})
        h_more, h_less = pair_states(engine, calib.items[:n_direction_pairs])
        dirs = compute_directions(h_more, h_less, method)
        neutral = utility_chunks(rt, cfg.ppl_tokens)
        emit("stage", {"stage": "loop", "calibration_pairs": len(calib.items)})
        loop = run_loop(scorer, calib, dirs, cfg, neutral, on_event)
        vec = dirs.vectors * loop.coefficients[:, None].astype(np.float32) if loop.kept else None
        if vec is not None:  # nothing kept: no file; a zero vector would read as a correction
            write(out_path, vec, model_hint=rt.info.arch or "llama", coefficients=loop.coefficients,
                  source=f"edge bias mitigate {suite.name} seed {cfg.seed}")
        emit("stage", {"stage": "held-out", "pairs": len(held.items)})
        res = MitigationResult(
            suite=suite.name, source=suite.source, config=asdict(cfg), direction_pairs=dirs.n_pairs,
            method=method, vector=None if vec is None else str(out_path), compute=scorer.record(),
            calibration_rows=[suite.items[i].row for i in cal_idx],
            heldout_rows=[suite.items[i].row for i in held_idx], loop=loop,
            excluded_category=cfg.exclude_category)
        _judge(res, _BeforeAfter(scorer, vec), held, neutral, bbq_spec, bbq_limit, second_suite, n_boot)
        res.elapsed_s = time.perf_counter() - t0
        _write(res, out_dir, rt)
        return res
    finally:
        if scorer is not None:
            scorer.close()
        rt.close()


class _BeforeAfter:
    """Runs a measurement without and then with the correction vector on the scorer."""

    def __init__(self, scorer: Any, vec: np.ndarray | None) -> None:
        self.scorer, self.vec = scorer, vec

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        self.scorer.set_control_vector(None)
        b = fn()
        if self.vec is None:  # no correction kept: after is before
            return b, b
        self.scorer.set_control_vector(self.vec)
        a = fn()
        self.scorer.set_control_vector(None)
        return b, a


def _judge(res: MitigationResult, both: _BeforeAfter, held: Any, neutral: list[list[int]],
           bbq_spec: str | None, bbq_limit: int, second_suite: str | None, n_boot: int) -> None:
    scorer = both.scorer
    hb, ha = both(lambda: score_pairs(scorer, held))
    res.heldout = judge_pairs(hb, ha, n_boot)
    cats = np.array([it.category for it in held.items])
    res.heldout_per_category = {
        c: judge_pairs((hb[0][cats == c], hb[1][cats == c]), (ha[0][cats == c], ha[1][cats == c]), n_boot)
        for c in sorted(set(cats.tolist()))}
    (ppl_b, _), (ppl_a, kl) = both(Utility(scorer, neutral))
    res.ppl = {"before": ppl_b, "after": ppl_a, "increase": ppl_a / ppl_b - 1,
               "tokens": sum(len(c) for c in neutral), "kl": kl}
    if bbq_spec:
        bbq = load_suite(bbq_spec)
        dis = bbq.subset([i for i, it in enumerate(bbq.items) if not it.ambiguous][:bbq_limit])
        bb, ba = both(lambda: score_bbq(scorer, dis))
        acc = [float(np.mean(x.argmax(1) == np.array([it.label for it in dis.items]))) for x in (bb, ba)]
        res.bbq_dis_accuracy = {"before": acc[0], "after": acc[1], "drop_points": 100 * (acc[0] - acc[1]),
                                "n": len(dis.items)}
    if second_suite:
        s2 = load_suite(second_suite)
        sb, sa = both(lambda: score_suite(scorer, s2))
        res.second_suite = {"suite": s2.name,
                            "before": {k: e.to_dict() for k, e in summarize(s2, sb, n_boot)[0].items()},
                            "after": {k: e.to_dict() for k, e in summarize(s2, sa, n_boot)[0].items()}}


def _write(res: MitigationResult, out_dir: str | None, rt: Any) -> None:
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_write(d / "results.json", "w") as f:
            json.dump(res.to_dict(), f, indent=1)
        md = report_md(res)
        with atomic_write(d / "report.md", "w") as f:
            f.write(md)
        with atomic_write(d / "report.html", "w") as f:
            f.write(report_html(md, f"edge bias mitigate: {res.method}"))
    h = res.to_dict()["heldout"]
    telemetry.log("fairness", {"command": "bias mitigate", "suite": res.suite, "heldout": h,
                               "ppl": res.ppl, "bbq_dis_accuracy": res.bbq_dis_accuracy},
                  model=rt.info, config=rt.config_record(correction=res.vector, compute=res.compute))


def report_md(r: MitigationResult) -> str:
    h = r.heldout
    assert h is not None

    def e(x: M.Estimate, d: int = 3, scale: float = 1.0) -> str:
        return f"{scale * x.value:.{d}f} [{scale * x.lo:.{d}f}, {scale * x.hi:.{d}f}]"

    def said(significant: bool) -> str:
        return "significant" if significant else "not significant"

    sig = h.significant
    lines = [f"# Bias mitigation: {r.suite}", "",
             (f"Vector: `{r.vector}`; " if r.vector else f"No vector written ({NO_VECTOR}); ")
             + f"{len(r.calibration_rows)} calibration rows, "
             f"{len(r.heldout_rows)} held-out rows (listed in results.json); "
             f"PPL budget +{100 * r.config['max_ppl_increase']:g}%.", "",
             "| held-out | before | after | fall (paired bootstrap) |", "|---|---|---|---|",
             f"| pct_stereotype | {e(h.before['pct_stereotype'], 1)} | {e(h.after['pct_stereotype'], 1)} | "
             f"{e(h.gap_reduction, 0, 100)}% of \\|pct−50\\| |",
             f"| mean ll diff (nats) | {e(h.before['mean_ll_diff'])} | {e(h.after['mean_ll_diff'])} | "
             f"{e(h.mean_ll_diff_reduction, 0, 100)}% |", "",
             f"Paired change (after − before; a fall when its CI lies below 0): \\|pct−50\\| "
             f"{e(h.gap_change, 2)} points, {said(sig['gap'])}; mean ll diff "
             f"{e(h.mean_ll_diff_change)} nats, {said(sig['mean_ll_diff'])}.", "",
             f"PPL on {r.config.get('ppl_tokens', M.PPL_TOKENS)} tokens of neutral text: "
             f"{r.ppl['before']:.3f} → {r.ppl['after']:.3f} ({100 * r.ppl['increase']:+.2f}%), "
             f"mean KL {r.ppl['kl']:.4f} nats/token."]
    x = r.heldout_per_category.get(r.excluded_category or "")
    if x is not None:
        lines.append(f"Category never used in the loop ({r.excluded_category}): change of \\|pct−50\\| "
                     f"{e(x.gap_change, 2)} points, " + ("worse beyond its CI." if x.gap_change.lo > 0 else
                                                          "not worse beyond its CI."))
    if r.bbq_dis_accuracy is not None:
        b = r.bbq_dis_accuracy
        lines.append(f"BBQ disambiguated accuracy ({b['n']} items): {100 * b['before']:.1f}% → "
                     f"{100 * b['after']:.1f}%.")
    lines += ["", "## Loop (calibration rows)", "",
              "| i | phase | gain | pct | mean ll diff | PPL | ΔPPL | KL | within budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for it in r.loop.iterations:
        lines.append(f"| {it.i} | {it.phase} | {it.gain:.3f} | {it.pct_stereotype:.1f} | "
                     f"{it.mean_ll_diff:.3f} | {it.ppl:.3f} | {100 * it.ppl_increase:+.2f}% | "
                     f"{it.kl:.4f} | {'yes' if it.feasible else 'no'} |")
    if r.loop.kept and r.loop.weights is not None and len(r.loop.weights):
        lines += ["", "Per-layer coefficients (layer 1 on): " + ", ".join(f"{c:.2f}" for c in r.loop.coefficients[1:])]
    return "\n".join(lines) + "\n"
