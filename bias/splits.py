"""The calibrate/judge cycle on N seeded random splits, for one or both correction methods.

Split s (seed + s) calibrates each method on its calibration rows and judges it on the
held-out rows, BBQ and generation (bias.judge). Everything that does not depend on the
split is computed once (bias.shared): the uncorrected scores of every row and instrument
and every pair's residual-stream states. results.json is rewritten after every finished
(split, method), so a Ctrl-C keeps what was done, and a rerun of the same command keeps
those results and computes only what is missing (`earlier_splits`). The summary gives each
figure's median and range over the finished splits, so one lucky split cannot carry the result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bias.audit import PairScores
from bias.feedback import check_ppl_tokens, split
from bias.judge import CategoryMoves, judge_bbq, judge_generation, judge_pair_rows, judge_parts
from bias.metrics import PPL_TOKENS, pct_stereotype
from bias.repeat import RepeatConfig
from bias.shared import Shared
from bias.splits_report import category_plot, report_html, report_md
from edge.errors import BadOptionError
from edge.paths import atomic_write

Event = Callable[[str, dict[str, Any]], None]
METHODS = ("steer", "ablate", "gate", "combo", "learn", "erase")
# BBQ items per condition by where a run judges BBQ. In llama.cpp each split scores them
# again (~0.24 s an item here): 120 keeps 5 splits in the hour but resolves a change in
# disambiguated accuracy to ±5-8 points only. learn's last-layer edit is judged in torch on
# the answers' rows read once a run (~0.15 s an item, then ~3 s a split for all of them).
BBQ_ITEMS = {"llama.cpp": 120, "torch": 500}


@dataclass
class SplitsConfig:
    n_splits: int = 5
    seed: int = 0
    calib_frac: float = 0.3
    exclude_category: str | None = None  # never calibrated on; judged apart
    methods: tuple[str, ...] = ("steer", "ablate")  # --method both
    max_ppl_increase: float = 0.02
    bbq_spec: str | None = None
    # ambiguous items, and as many disambiguated (all splits share them); None: BBQ_ITEMS by
    # where the run judges BBQ (bias.methods resolves it)
    bbq_per_condition: int | None = None
    probes_spec: str | None = "probes"
    repeat: int = 3
    temp: float = 0.8
    n_boot: int = 1000
    steer_blocks: int = 3  # the control-vector loop's probed blocks and gain steps
    steer_iter: int = 4
    keep_models: bool = False  # keep each split's corrected GGUFs (~1 file size each)
    # Generation is the slowest instrument (~100 s per judgement here) and the probes do not
    # depend on the split: judge it on the first `gen_splits` splits only.
    gen_splits: int = 1
    weights: str = "source"  # the deployed ablated GGUF: "source" (re-quantized) or "F16"
    output: str | None = None  # -o: split 0's correction (the ablated GGUF; see outputs())
    # Caps for a busy or small machine: a random share of each split's calibration rows
    # (what the loops score and the directions average) and of its held-out rows (the
    # kept-out category's rows are always all judged).
    calib_limit: int | None = None
    heldout_limit: int | None = None
    ppl_tokens: int = PPL_TOKENS  # the utility's neutral text (bias.feedback.utility_chunks)

    def validate(self) -> None:
        if self.n_splits < 1:
            raise BadOptionError(f"--splits {self.n_splits} must be ≥ 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise BadOptionError(f"--method {','.join(bad) or '(none)'}: use steer, ablate, gate, combo, learn, "
                                 "erase, both or all")
        if not 0 < self.calib_frac < 1:
            raise BadOptionError(f"calibration fraction {self.calib_frac} must be in (0, 1)")
        if self.weights not in ("source", "F16"):
            raise BadOptionError(f"--weights {self.weights}: use source or f16")
        check_ppl_tokens(self.ppl_tokens)

    def rows(self, suite: Any, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Split s's (calibration, held-out) item indices, after the caps."""
        cal, held = (np.asarray(x, dtype=int) for x in split(suite, self.calib_frac, self.seed + s,
                                                             self.exclude_category))
        rng = np.random.default_rng(self.seed + s + 10_000)
        if self.calib_limit and len(cal) > self.calib_limit:
            cal = np.sort(rng.choice(cal, self.calib_limit, replace=False))
        if self.heldout_limit:
            kept = np.array([suite.items[i].category == self.exclude_category for i in held], dtype=bool)
            rest = held[~kept]
            if len(rest) > self.heldout_limit:
                rest = rng.choice(rest, self.heldout_limit, replace=False)
            held = np.sort(np.concatenate([rest, held[kept]]))
        return cal, held

    def outputs(self) -> dict[str, Path]:
        """Where split 0's corrections go: -o takes the first method's (the learned edit's
        model, else the erased head's, else the combined, else the gated, else the ablated model, else the control
        vector); each other one goes beside it as STEM.<method>.gguf."""
        if not self.output:
            return {}
        out = Path(self.output)
        first = next(m for m in ("learn", "erase", "combo", "gate", "ablate", "steer") if m in self.methods)
        return {m: out if m == first else out.with_name(f"{out.stem}.{m}.gguf") for m in self.methods}

    def repeat_config(self) -> RepeatConfig | None:
        # no greedy reference: the judgement compares sampled answers only (saves 1/(K+1) of the time)
        return RepeatConfig(repeat=self.repeat, temp=self.temp, greedy_reference=False) if self.repeat > 0 else None


@dataclass
class Correction:
    """A fitted correction, as the judge needs it: scores and generation with it applied."""

    method: str
    # suite → PairScores, or (more, less) where the words part is not measured
    score_pairs: Callable[[Any], PairScores | tuple[np.ndarray, np.ndarray]]
    score_bbq: Callable[[Any], np.ndarray]
    utility: Callable[[], tuple[float, float]]  # (PPL, KL vs uncorrected) on neutral text
    generate: Callable[[Any, RepeatConfig], list[dict[str, Any]]]  # probes → RepeatResult.items
    fit: dict[str, Any] = field(default_factory=dict)  # the loop's record
    close: Callable[[], None] = lambda: None
    # No correction (a loop that found nothing within budget): judged by the shared
    # uncorrected figures themselves. Rescoring would differ from them by the scorer's
    # batch-layout jitter (~0.01 nats), which a paired bootstrap over 1,000 pairs calls
    # significant: a correction that did nothing was reported as making a category worse.
    is_identity: bool = False
    # A correction judged in its own engine (learn's torch rows): the held-out pairs and PPL
    # before it, from that engine too, so a paired change holds the correction alone
    before_pairs: Callable[[Any], PairScores] | None = None
    base_ppl: float | None = None
    engine: str = "llama.cpp"
    # the deployed file as plain llama.cpp scores it: the held-out pct beside the engine's
    score_deployed: Callable[[Any], PairScores] | None = None
    # a re-quantized deployed file's uncorrected source in plain llama.cpp: its quantized
    # arithmetic moves pairs apart from the edit, so the file's own change is compared too
    score_source: Callable[[Any], PairScores] | None = None
    # the held-out pairs before and after the correction in llama.cpp's arithmetic on the
    # re-quantized file's weights (bias.arith, in torch), two readings each: what the file
    # should read, and how far the arithmetic's chaotic part moves it
    score_device: Callable[[Any], tuple[list[PairScores], list[PairScores]]] | None = None
    # BBQ's answers before the correction in its own engine (None: the shared llama.cpp scores)
    before_bbq: Callable[[Any], np.ndarray] | None = None

    @classmethod
    def identity(cls, method: str, fit: dict[str, Any]) -> Correction:
        def unused(*_: Any) -> Any:
            raise AssertionError("an identity correction is judged by the shared scores")

        return cls(method, unused, unused, unused, unused, fit, is_identity=True)


# (method, calibration indices, work dir, split index): split 0 writes the -o files
Fitter = Callable[[str, np.ndarray, Path, int], Correction]


@dataclass
class SplitsResult:
    config: dict[str, Any]
    splits: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_correction(sh: Shared, corr: Correction, held: np.ndarray, cfg: SplitsConfig,
                     on_event: Event | None = None, generation: bool = True) -> dict[str, Any]:
    """Every instrument before (shared) and after (this correction), paired."""
    emit = on_event or (lambda kind, data: None)
    cats = sh.categories
    before = (sh.base[0][held], sh.base[1][held])
    words = None if sh.base_words is None else sh.base_words[held]
    base_ppl = sh.base_ppl if corr.base_ppl is None else corr.base_ppl
    if corr.before_pairs is not None:
        emit("stage", {"stage": f"{corr.method}: held-out pairs before it ({corr.engine})", "pairs": len(held)})
        b = corr.before_pairs(sh.suite.subset(held.tolist()))
        before, words = (b.more, b.less), b.words
    if corr.is_identity:
        after, words_after = before, words
    else:
        emit("stage", {"stage": f"{corr.method}: held-out pairs", "pairs": len(held)})
        scored = corr.score_pairs(sh.suite.subset(held.tolist()))
        after, words_after = ((scored.more, scored.less), scored.words) if isinstance(scored, PairScores) \
            else (scored, None)
    pj = judge_pair_rows(before, after, cats[held], n_boot=cfg.n_boot)
    out: dict[str, Any] = {"fit": corr.fit, "heldout": pj.to_dict(),
                           "categories": pj.category_moves(cfg.exclude_category),
                           "heldout_scores": {"ll_more": after[0].tolist(), "ll_less": after[1].tolist()}}
    if words is not None and words_after is not None:
        parts = judge_parts((before[0] - before[1], after[0] - after[1]), (words, words_after), cats[held],
                            n_boot=cfg.n_boot)
        out["heldout_parts"] = {k: {c: j.to_dict() for c, j in d.items()} for k, d in parts.items()}
        out["heldout_scores"]["ll_words_diff"] = words_after.tolist()
    out["engine"] = corr.engine
    if corr.score_deployed is not None:
        emit("stage", {"stage": f"{corr.method}: held-out pairs on the deployed file (plain llama.cpp)",
                       "pairs": len(held)})
        dep = corr.score_deployed(sh.suite.subset(held.tolist()))
        pct, eng = (float(pct_stereotype(*p)) for p in ((dep.more, dep.less), after))
        out["deployed"] = {"pct_stereotype": pct, "engine_pct_stereotype": eng, "difference": pct - eng,
                           "ll_diff": (dep.more - dep.less).tolist()}
        if corr.score_source is not None:
            emit("stage", {"stage": f"{corr.method}: held-out pairs on the uncorrected source file (plain llama.cpp)",
                           "pairs": len(held)})
            src = corr.score_source(sh.suite.subset(held.tolist()))
            spct, beng = (float(pct_stereotype(*p)) for p in ((src.more, src.less), before))
            out["deployed"].update(source_pct_stereotype=spct, engine_before_pct_stereotype=beng,
                                   change_difference=(pct - spct) - (eng - beng))
        if corr.score_device is not None:
            from bias.arith import DeviceSpread

            emit("stage", {"stage": f"{corr.method}: held-out pairs in llama.cpp's arithmetic (torch)",
                           "pairs": len(held)})
            db, da = corr.score_device(sh.suite.subset(held.tolist()))
            dev = {}
            for k, reads in (("before", db), ("after", da)):
                sp = DeviceSpread.of([r.more - r.less for r in reads])
                dev[k] = {"pcts": sp.pcts, "chaotic_sd": sp.chaotic_sd, "expected_pct": sp.mean, "pct_sd": sp.sd}
            out["deployed"]["device"] = dev
            out["deployed"]["device_difference"] = pct - dev["after"]["expected_pct"]
    ppl, kl = (base_ppl, 0.0) if corr.is_identity else corr.utility()
    out["ppl"] = {"before": base_ppl, "after": ppl, "increase": ppl / base_ppl - 1, "kl": kl}
    if cfg.exclude_category and cfg.exclude_category in pj.per_category:
        out["kept_out"] = {"name": cfg.exclude_category,
                           **{k: j.to_dict() for k, j in pj.per_category[cfg.exclude_category].items()}}
    bbq_before = sh.bbq_base if corr.before_bbq is None or sh.bbq is None else corr.before_bbq(sh.bbq)
    if sh.bbq is not None and bbq_before is not None:
        if not corr.is_identity:
            emit("stage", {"stage": f"{corr.method}: BBQ", "items": len(sh.bbq.items)})
        bbq_after = bbq_before if corr.is_identity else corr.score_bbq(sh.bbq)
        bj = judge_bbq(sh.bbq_flags(bbq_before), sh.bbq_flags(bbq_after), n_boot=cfg.n_boot)
        out["bbq"] = {k: j.to_dict() for k, j in bj.items()}
        out["bbq_engine"] = corr.engine if corr.before_bbq is not None else "llama.cpp"
    if generation and sh.probes is not None and sh.gen_base is not None and sh.repeat is not None:
        if not corr.is_identity:
            emit("stage", {"stage": f"{corr.method}: generation", "prompts": len(sh.probes.items)})
        items = sh.gen_base if corr.is_identity else corr.generate(sh.probes, sh.repeat)
        out["generation"] = judge_generation(sh.gen_base, items, n_boot=cfg.n_boot).to_dict()
        out["generation"]["answers_after"] = [[a["label"] for a in it["answers"]] for it in items]
    return out


# ---- the summary over splits -------------------------------------------------------------
FIGURES: dict[str, Callable[[dict[str, Any]], float]] = {
    "heldout_pct_before": lambda r: r["heldout"]["pct_stereotype"]["before"]["value"],
    "heldout_pct_after": lambda r: r["heldout"]["pct_stereotype"]["after"]["value"],
    "heldout_pct_change": lambda r: r["heldout"]["pct_stereotype"]["change"]["value"],
    "heldout_mean_ll_diff_change": lambda r: r["heldout"]["mean_ll_diff"]["change"]["value"],
    # of which: the rewritten tokens' part and the shared tokens' (bias.audit.PairScores)
    "heldout_words_part_change": lambda r: r["heldout_parts"]["words"]["ALL"]["change"]["value"],
    "heldout_rest_part_change": lambda r: r["heldout_parts"]["rest"]["ALL"]["change"]["value"],
    "heldout_rest_pct_before": lambda r: r["heldout_parts"]["rest_pct"]["ALL"]["before"]["value"],
    "heldout_rest_pct_after": lambda r: r["heldout_parts"]["rest_pct"]["ALL"]["after"]["value"],
    "pair_slope": lambda r: r["heldout"]["diagnostics"]["slope"],
    "pair_corr": lambda r: r["heldout"]["diagnostics"]["corr"],
    "ppl_increase_pct": lambda r: 100 * r["ppl"]["increase"],
    "bbq_acc_dis_change_points": lambda r: 100 * r["bbq"]["acc_dis"]["change"]["value"],
    "bbq_s_amb_after": lambda r: r["bbq"]["s_amb"]["after"]["value"],
    "gen_stereo_rate_after": lambda r: r["generation"]["after"]["value"],
    "kept_out_pct_change": lambda r: r["kept_out"]["pct_stereotype"]["change"]["value"],
}
CHECKS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "ci_contains_50_after_excluded_before": lambda r: (r["heldout"]["pct_stereotype"]["contains_after"]
                                                       and r["heldout"]["pct_stereotype"]["excluded_before"]),
    "paired_change_significant": lambda r: r["heldout"]["pct_stereotype"]["toward_neutral"],
    "no_category_made_worse": lambda r: not r["categories"]["made_worse"],
    # the acceptance's own wording: only a category biased before counts (the check above
    # counts any category, e.g. one at neutral pushed significantly off it)
    "no_biased_category_made_worse": lambda r: not set(r["categories"]["made_worse"])
    & set(r["categories"]["biased_before"]),
    "biased_categories_moved": lambda r: set(r["categories"]["moved_toward_neutral"])
    == set(r["categories"]["biased_before"]),
    # the same by point estimate alone: every biased category ended nearer neutral
    "biased_categories_closer": lambda r: set(r["categories"]["closer"]) == set(r["categories"]["biased_before"]),
    # The same two category checks read on each category's pct (neutral 50), the figure the
    # acceptance judges overall: a shrink that flips no pair's sign leaves a pct where it was.
    "no_biased_category_made_worse_pct": lambda r: not _pct_moves(r).worse & _pct_moves(r).biased,
    "biased_categories_moved_pct": lambda r: _pct_moves(r).moved == _pct_moves(r).biased,
    "biased_categories_closer_pct": lambda r: _pct_moves(r).closer == _pct_moves(r).biased,
    "ppl_within_budget": lambda r: r["ppl"]["increase"] <= 0.02,
    "bbq_acc_drop_le_1pt": lambda r: r["bbq"]["acc_dis"]["change"]["value"] >= -0.01,
    "kept_out_not_worse": lambda r: not r["kept_out"]["mean_ll_diff"]["away_from_neutral"],
    # The same four CrowS checks counted on the shared tokens alone (heldout_parts), as the
    # CrowS-Pairs authors score: a correction that only changes how likely the group words
    # themselves are passes the checks above and not these.
    "shared_tokens_ci_contains_50_after_excluded_before": lambda r: (
        r["heldout_parts"]["rest_pct"]["ALL"]["contains_after"] and r["heldout_parts"]["rest_pct"]["ALL"]["excluded_before"]),
    "shared_tokens_paired_change_significant": lambda r: r["heldout_parts"]["rest_pct"]["ALL"]["toward_neutral"],
    "shared_tokens_no_category_made_worse": lambda r: not _shared_moves(r).worse,
    "shared_tokens_biased_categories_moved": lambda r: _shared_moves(r).moved == _shared_moves(r).biased,
}


def _shared_moves(r: dict[str, Any]) -> CategoryMoves:
    """The category checks by the categories' shared-token mean."""
    return CategoryMoves.of(r["heldout_parts"]["rest"], r.get("kept_out", {}).get("name"))


def _pct_moves(r: dict[str, Any]) -> CategoryMoves:
    """The category checks by the categories' held-out pct."""
    return CategoryMoves.of({c: d["pct_stereotype"] for c, d in r["heldout"]["per_category"].items()},
                            r.get("kept_out", {}).get("name"))


def _values(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """get(r) for each run that has the figure (a run without BBQ has no BBQ figure)."""
    out = []
    for r in runs:
        with suppress(KeyError, TypeError):
            out.append(get(r))
    return out


def summarize(splits: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, Any]:
    """Per method: median, min and max of each figure; how many splits pass each check."""
    out: dict[str, Any] = {}
    for m in methods:
        runs = [s["methods"][m] for s in splits if m in s.get("methods", {})]
        figs: dict[str, Any] = {}
        for name, get in FIGURES.items():
            vals = [float(v) for v in _values(runs, get)]
            if vals:
                figs[name] = {"median": float(np.median(vals)), "min": min(vals), "max": max(vals), "n": len(vals)}
        checks = {}
        for name, test in CHECKS.items():
            ok = [bool(v) for v in _values(runs, test)]
            if ok:
                checks[name] = f"{sum(ok)}/{len(ok)}"
        out[m] = {"splits": len(runs), "figures": figs, "checks": checks}
    return out


def run_metrics(res: SplitsResult, method: str, results: Path) -> dict[str, Any] | None:
    """One method's figures over the finished splits, as a `fairness` run-log record's
    metrics (None before its first split finished): medians and ranges, checks passed."""
    summary = summarize(res.splits, (method,))[method]
    if not summary["splits"]:
        return None
    return {"command": "bias mitigate", "method": method, "suite": res.shared.get("suite"),
            "splits": summary["splits"], "of": res.config["n_splits"], "complete": res.complete,
            "exclude_category": res.config.get("exclude_category"), "figures": summary["figures"],
            "checks": summary["checks"], "results": str(results), "elapsed_s": round(res.elapsed_s, 1)}


# What else must match for an earlier run's splits to be kept: the model, the suite, the
# methods' own settings and the weights the scores were computed with.
SAME_RUN = ("model", "suite", "ablate_config", "gate_config", "learn_config", "erase_config")
SAME_COMPUTE = ("precision", "path", "source_type")
# how `edge bias mitigate` spells a setting, for the message that says why nothing was kept
OPTION = {"n_splits": "--splits", "seed": "--seed", "calib_frac": "--calib-frac", "exclude_category": "--exclude-category",
          "methods": "--method", "max_ppl_increase": "--max-ppl-increase", "bbq_spec": "--bbq",
          "bbq_per_condition": "--bbq-items", "repeat": "--repeat", "temp": "--temp", "steer_blocks": "--blocks",
          "steer_iter": "--max-iter", "weights": "--weights", "output": "-o", "calib_limit": "--calib-limit",
          "heldout_limit": "--heldout-limit", "ppl_tokens": "--ppl-tokens", "model": "MODEL", "suite": "--suite",
          "ablate_config": "--ablate-where/--ablate-objective", "learn_config": "--learn-objective/--learn-layers",
          "erase_config": "--erase-rank/--erase-form", "compute precision": "--precision"}


@dataclass
class Earlier:
    """The finished (split, method) results of an earlier run of the same command."""

    splits: list[dict[str, Any]]
    elapsed_s: float
    differs: list[str] = field(default_factory=list)  # an earlier run's settings that differ: none kept

    @property
    def results(self) -> int:
        return sum(len(s["methods"]) for s in self.splits)


def earlier_splits(sh: Shared, cfg: SplitsConfig, out_dir: str | Path, info: dict[str, Any]) -> Earlier:
    """What out_dir/results.json holds from an earlier run with the same settings, model and
    suite: the splits whose rows are still what `cfg.rows` draws, each with its finished
    methods. A method whose written file (split 0's -o) is gone is dropped: it is fitted again."""
    none = Earlier([], 0.0)
    try:
        old = json.loads((Path(out_dir) / "results.json").read_text())
        new = json.loads(json.dumps(asdict(cfg)))
        # a setting added since that run is missing from its config: it ran at the default
        default = json.loads(json.dumps(asdict(SplitsConfig())))
        differs = [k for k in sorted(set(old["config"]) | set(new))
                   if old["config"].get(k, default.get(k)) != new.get(k)]
        differs += [k for k in SAME_RUN if old["shared"].get(k) != json.loads(json.dumps(info.get(k)))]
        differs += [f"compute {k}" for k in SAME_COMPUTE
                    if (old["shared"].get("compute") or {}).get(k) != (info.get("compute") or {}).get(k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, partial or another version
        return none
    if differs:
        return Earlier([], 0.0, differs)
    kept: list[dict[str, Any]] = []
    outputs = {str(f) for f in cfg.outputs().values()}  # work copies of later splits are removed anyway
    for s, rec in enumerate(old["splits"][:cfg.n_splits]):
        cal, held = cfg.rows(sh.suite, s)
        if (rec.get("seed") != cfg.seed + s or rec.get("calibration_rows") != [sh.suite.items[i].row for i in cal]
                or rec.get("heldout_rows") != [sh.suite.items[i].row for i in held]):
            break
        methods = {m: r for m, r in rec.get("methods", {}).items()
                   if m in cfg.methods and all(Path(f).exists() for f in _written(r) if f in outputs)}
        kept.append({**rec, "methods": methods})
    return Earlier(kept, float(old.get("elapsed_s", 0.0))) if any(r["methods"] for r in kept) else none


def _written(r: dict[str, Any]) -> list[str]:
    """The files a (split, method) result says it wrote: a control vector, a folded model."""
    fit = r.get("fit") or {}
    return [f for f in (fit.get("vector"), (fit.get("fold") or {}).get("path")) if f]


def time_left(splits: list[dict[str, Any]], cfg: SplitsConfig) -> float | None:
    """Seconds the (split, method)s not yet in `splits` should take, from those that are: each
    method at its median time on the plain splits. Split 0 also writes and scores the -o file
    and the first gen_splits judge generation (a learn run's split 0 took 5× a plain one), so
    they are timed apart, and there is no estimate (None) before a method's first plain split."""
    slow = max(1, cfg.gen_splits)
    left = 0.0
    for m in cfg.methods:
        took = {i: rec["methods"][m]["seconds"] for i, rec in enumerate(splits) if m in rec["methods"]}
        plain = [t for i, t in took.items() if i >= slow]
        if not plain:
            return None
        first = [t for i, t in took.items() if i < slow]
        left += sum(float(np.median(first if i < slow and first else plain))
                    for i in range(cfg.n_splits) if i not in took)
    return left


def run_splits(sh: Shared, fitter: Fitter, cfg: SplitsConfig, out_dir: str | Path,
               on_event: Event | None = None, info: dict[str, Any] | None = None,
               on_end: Callable[[SplitsResult], None] | None = None, fresh: bool = False) -> SplitsResult:
    """Calibrate and judge every method on cfg.n_splits splits; results.json after each.
    What an earlier run of the same command in out_dir finished is kept unless `fresh`.
    `on_end` gets the result at the end, also after Ctrl-C or an error (what finished)."""
    cfg.validate()
    emit = on_event or (lambda kind, data: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = SplitsResult(asdict(cfg), shared={"base_ppl": sh.base_ppl, "pairs": len(sh.suite.items),
                                            "bbq_items": len(sh.bbq.items) if sh.bbq else 0,
                                            "probes": len(sh.probes.items) if sh.probes else 0,
                                            **(info or {})})
    earlier = Earlier([], 0.0) if fresh else earlier_splits(sh, cfg, out, info or {})
    if earlier.differs:  # say why nothing is kept: its results.json is about to be replaced
        emit("stage", {"stage": f"{out / 'results.json'} holds a run with other settings "
                                f"({', '.join(OPTION.get(k, k) for k in earlier.differs)}): starting over, "
                                "it will be replaced"})
    if earlier.results:
        res.shared["kept_from_earlier_run"] = {"results": earlier.results, "elapsed_s": earlier.elapsed_s}
    t0 = time.perf_counter() - earlier.elapsed_s  # elapsed_s counts the earlier run's time too

    def save() -> None:
        res.elapsed_s = time.perf_counter() - t0
        res.summary = summarize(res.splits, cfg.methods)
        d = res.to_dict()
        with atomic_write(out / "results.json", "w") as f:
            json.dump(d, f, indent=1)
        pngs = [p.name for m in cfg.methods if (p := category_plot(d, m, out / f"categories-{m}.png"))]
        md = report_md(d, pngs)
        with atomic_write(out / "report.md", "w") as f:
            f.write(md)
        with atomic_write(out / "report.html", "w") as f:
            f.write(report_html(md, f"edge bias mitigate: {', '.join(cfg.methods)}"))

    try:
        _each_split(sh, fitter, cfg, out, res, save, emit, on_event, earlier)
    finally:
        if on_end is not None:
            res.elapsed_s = time.perf_counter() - t0
            with suppress(OSError):  # a run log that cannot be written must not hide why the run ended
                on_end(res)
    return res


def _each_split(sh: Shared, fitter: Fitter, cfg: SplitsConfig, out: Path, res: SplitsResult,
                save: Callable[[], None], emit: Event, on_event: Event | None, earlier: Earlier) -> None:
    for s in range(cfg.n_splits):
        seed = cfg.seed + s
        cal, held = cfg.rows(sh.suite, s)
        kept = earlier.splits[s]["methods"] if s < len(earlier.splits) else {}
        rec: dict[str, Any] = {"seed": seed, "calibration_rows": [sh.suite.items[i].row for i in cal],
                               "heldout_rows": [sh.suite.items[i].row for i in held], "methods": {}}
        res.splits.append(rec)
        for m in cfg.methods:
            if m in kept:
                rec["methods"][m] = kept[m]
                emit("kept", {"split": s + 1, "of": cfg.n_splits, "seed": seed, "method": m,
                              "seconds": kept[m].get("seconds", 0.0)})
                continue
            emit("split", {"split": s + 1, "of": cfg.n_splits, "seed": seed, "method": m})
            work = out / f"split{s}"
            work.mkdir(exist_ok=True)
            t1 = time.perf_counter()
            corr = fitter(m, cal, work, s)
            try:
                rec["methods"][m] = judge_correction(sh, corr, held, cfg, on_event, s < cfg.gen_splits)
            finally:
                corr.close()
            rec["methods"][m]["seconds"] = time.perf_counter() - t1
            save()
            emit("done", {"split": s + 1, "of": cfg.n_splits, "seed": seed, "method": m,
                          "seconds": rec["methods"][m]["seconds"], "left_s": time_left(res.splits, cfg)})
    res.complete = True
    save()
