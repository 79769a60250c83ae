"""`edge bias compare BEFORE AFTER`: two audits of the same suite, judged as a paired change.

Two audits' CIs can overlap while the change between them is significant, and the other
way round: the same items were scored twice, so the honest comparison resamples items once
for both arms (bias.judge), as the split runs of `edge bias mitigate` do on their held-out
rows. This reads the per-item scores each `edge bias audit` writes to results.json (the
uncorrected model and the corrected GGUF, or a model with and without `--correction`) and
judges every figure before/after on the items both audits scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bias import metrics as M
from bias.audit import STEREOSET_METRICS
from bias.judge import (
    BBQFlags,
    Judged,
    judge,
    judge_bbq,
    judge_generation,
    judge_pair_rows,
    judge_parts,
)
from bias.report import text_table
from edge.errors import BadOptionError, SuiteError
from edge.telemetry import estimate_text

# StereoSet's neutral points: ss 50 (no preference), lms and icat have none (quality scores)
STEREOSET_NEUTRAL = {"ss": 50.0, "lms": float("nan"), "icat": float("nan")}


@dataclass
class AuditComparison:
    """Every figure of two audits on their common items: before, after, paired change."""

    suite: str
    kind: str
    source: str
    before: dict[str, Any]  # results.json path, model, correction
    after: dict[str, Any]
    n_items: int  # scored by both audits
    figures: dict[str, Judged]
    per_category: dict[str, dict[str, Judged]]
    counts: dict[str, int]  # items per category
    category_moves: dict[str, Any] | None = None  # pair suites: bias.judge.PairRowsJudged.category_moves
    diagnostics: dict[str, Any] | None = None  # pair suites: slope and correlation of change on difference
    generation: Judged | None = None  # probes with --repeat on both sides
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "kind": self.kind, "source": self.source, "before": self.before,
                "after": self.after, "n_items": self.n_items,
                "figures": {k: j.to_dict() for k, j in self.figures.items()},
                "per_category": {c: {k: j.to_dict() for k, j in d.items()} for c, d in self.per_category.items()},
                "counts": self.counts, "category_moves": self.category_moves, "diagnostics": self.diagnostics,
                "generation": None if self.generation is None else self.generation.to_dict(), "notes": self.notes}


def load_audit(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """An `edge bias audit` results.json, given it or its folder."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise BadOptionError(f"{path} has no results.json: pass the folder `edge bias audit` wrote (--out) "
                             "or its results.json")
    try:
        res = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise BadOptionError(f"{f} is not readable JSON ({e}); run the audit again") from None
    if isinstance(res, dict) and "splits" in res and "config" in res:
        raise BadOptionError(f"{f} is an `edge bias mitigate` result, not an audit: its report.md already "
                             "compares before and after; audit the corrected model to compare it here")
    if not isinstance(res, dict) or not {"suite", "kind", "items"} <= set(res):
        raise BadOptionError(f"{f} is not an `edge bias audit` results.json (no suite, kind and items)")
    return f, res


def compare_audits(before: str | Path, after: str | Path, *, n_boot: int = M.N_BOOT) -> AuditComparison:
    """Judge AFTER against BEFORE on the items both audits scored (paired bootstrap)."""
    fb, b = load_audit(before)
    fa, a = load_audit(after)
    if fb.resolve() == fa.resolve():
        raise BadOptionError(f"BEFORE and AFTER are the same file ({fb}); pass two audits")
    if (b["suite"], b.get("source")) != (a["suite"], a.get("source")):
        raise BadOptionError(f"BEFORE scored {b['suite']} ({b.get('source')}), AFTER {a['suite']} "
                             f"({a.get('source')}): compare two audits of the same suite file")
    after_by_id = {it["id"]: it for it in a["items"]}
    pairs = [(it, after_by_id[it["id"]]) for it in b["items"] if it["id"] in after_by_id]
    if len(pairs) < 2:
        raise BadOptionError(f"the two audits share {len(pairs)} items; audit both with the same --suite "
                             "(and --limit)")
    ib, ia = [p[0] for p in pairs], [p[1] for p in pairs]
    cats = np.array([it["category"] for it in ib])
    side = {k: {"results": str(r), "model": d.get("model"), "correction": d.get("correction")}
            for k, r, d in (("before", fb, b), ("after", fa, a))}
    out = AuditComparison(b["suite"], b["kind"], str(b.get("source")), side["before"], side["after"], len(pairs),
                          {}, {}, {c: int((cats == c).sum()) for c in sorted(set(cats.tolist()))})
    if len(pairs) < max(len(b["items"]), len(a["items"])):
        out.notes.append(f"compared on the {len(pairs)} items both audits scored (BEFORE {len(b['items'])}, "
                         f"AFTER {len(a['items'])})")
    if b["kind"] == "pairs":
        _pairs(out, ib, ia, cats, n_boot)
        _generation(out, b.get("repeat"), a.get("repeat"), n_boot)
    elif b["kind"] == "bbq":
        _bbq(out, ib, ia, cats, n_boot)
    else:
        arrays = [np.array([[it[k] for it in items] for k in ("ll_stereo", "ll_anti", "ll_unrelated")])
                  for items in (ib, ia)]

        def row(m: np.ndarray) -> dict[str, Judged]:
            return {k: judge(f, list(arrays[0][:, m]), list(arrays[1][:, m]), neutral=STEREOSET_NEUTRAL[k],
                             n_boot=n_boot) for k, f in STEREOSET_METRICS.items()}

        out.figures = row(np.ones(len(cats), bool))
        out.per_category = {c: row(cats == c) for c in out.counts}
    return out


def _pairs(out: AuditComparison, ib: list[dict[str, Any]], ia: list[dict[str, Any]], cats: np.ndarray,
           n_boot: int) -> None:
    def scores(items: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        return np.array([it["ll_more"] for it in items]), np.array([it["ll_less"] for it in items])

    before, after = scores(ib), scores(ia)
    pj = judge_pair_rows(before, after, cats, n_boot=n_boot)
    out.figures = {"pct_stereotype": pj.pct, "mean_ll_diff": pj.mean_ll_diff}
    out.per_category = pj.per_category
    out.category_moves = pj.category_moves()
    out.diagnostics = pj.diagnostics.to_dict()
    if all("ll_words_diff" in it for it in ib + ia):  # the difference's two parts (bias.audit.PairScores)
        words = (np.array([it["ll_words_diff"] for it in ib]), np.array([it["ll_words_diff"] for it in ia]))
        parts = judge_parts((before[0] - before[1], after[0] - after[1]), words, cats, n_boot=n_boot)
        out.figures |= {"words_ll_diff": parts["words"]["ALL"], "rest_ll_diff": parts["rest"]["ALL"],
                        "rest_pct_stereotype": parts["rest_pct"]["ALL"]}


def _bbq(out: AuditComparison, ib: list[dict[str, Any]], ia: list[dict[str, Any]], cats: np.ndarray,
         n_boot: int) -> None:
    # results.json keeps each item's scores, not which answer is the biased target: read the files
    from bias.suites import load_suite

    try:
        suite = load_suite(f"bbq:{out.source}")
    except SuiteError as e:
        raise BadOptionError(f"BBQ's comparison needs the files the audits scored, for each item's target "
                             f"answer: {e}") from None
    by_id = {it.id: it for it in suite.items}
    missing = [it["id"] for it in ib if it["id"] not in by_id]
    if missing:
        raise BadOptionError(f"{len(missing)} audited items (e.g. {missing[0]}) are not in {out.source} any more; "
                             "compare audits of the files as they are, or restore them")
    items = [by_id[it["id"]] for it in ib]
    flags = [BBQFlags.from_scores(np.array([it["ll"] for it in side]), items) for side in (ib, ia)]
    out.figures = judge_bbq(*flags, n_boot=n_boot)
    for c in out.counts:
        m = cats == c
        sub = [BBQFlags(f.correct[m], f.biased[m], f.not_unknown[m], f.ambiguous[m]) for f in flags]
        out.per_category[c] = judge_bbq(*sub, n_boot=n_boot)


def _generation(out: AuditComparison, rb: dict[str, Any] | None, ra: dict[str, Any] | None, n_boot: int) -> None:
    """The probes' sampled answers (`--repeat K --temp T` on both audits): stereotype rate."""
    if not rb or not ra or "items" not in rb or "items" not in ra:
        if rb or ra:
            out.notes.append("generation not compared: only one audit sampled the probes (--repeat)")
        return
    if (rb.get("temp"), rb.get("max_tokens")) != (ra.get("temp"), ra.get("max_tokens")):
        out.notes.append(f"generation not compared: sampled at T={rb.get('temp')} before, T={ra.get('temp')} after")
        return
    by_row = {it["row"]: it for it in ra["items"]}
    common = [it for it in rb["items"] if it["row"] in by_row]
    if len(common) >= 2:
        out.generation = judge_generation(common, [by_row[it["row"]] for it in common], n_boot=n_boot)


def verdict(j: Judged) -> str:
    """The change in words: toward or away from the figure's neutral point, significant or not."""
    if np.isnan(j.neutral):  # a score without a neutral point (accuracy, lms): higher or lower
        return "higher" if j.change.lo > 0 else "lower" if j.change.hi < 0 else "no significant change"
    if j.overshot:
        return "overshot neutral"
    if j.toward_neutral:
        return "toward neutral"
    if j.away_from_neutral:
        return "away from neutral"
    return "no significant change"


SIGNED = {"mean_ll_diff", "words_ll_diff", "rest_ll_diff", "likelihood_diff", "s_amb", "s_dis"}  # 0 is neutral


def comparison_lines(c: AuditComparison) -> list[str]:
    """The comparison as a terminal table: figures, then categories, then what moved."""
    def name(d: dict[str, Any]) -> str:
        m = Path(d["model"]).name if d.get("model") else "?"
        return m + (f" + {Path(d['correction']).name}" if d.get("correction") else "")

    def cells(j: Judged, k: str) -> list[str]:
        f = ".1f" if k in M.POINTS else ".3f"
        fs = "+" + f if k in SIGNED else f
        return [estimate_text(j.before.to_dict(), fs), estimate_text(j.after.to_dict(), fs),
                estimate_text(j.change.to_dict(), "+" + f), verdict(j)]

    out = [f"{c.suite}: {c.n_items:,} items in both audits; 95% CIs, the change by paired bootstrap",
           f"  before: {name(c.before)}", f"  after:  {name(c.after)}", *[f"  note: {n}" for n in c.notes]]
    figs = dict(c.figures) | ({"generation stereo_rate": c.generation} if c.generation is not None else {})
    out += text_table([["", "before", "after", "change", ""]] + [[k, *cells(j, k)] for k, j in figs.items()])
    key = "mean_ll_diff" if c.kind == "pairs" else "s_amb" if c.kind == "bbq" else "ss"
    if c.per_category:
        out.append(f"per category, {key}:")
        out += text_table([["", "n", "before", "after", "change", ""]]
                      + [[cat, str(c.counts[cat]), *cells(d[key], key)] for cat, d in c.per_category.items()])
    if c.category_moves is not None:
        mv = c.category_moves
        out.append("categories biased before: " + (", ".join(mv["biased_before"]) or "none")
                   + "; moved toward neutral: " + (", ".join(mv["moved_toward_neutral"]) or "none")
                   + "; made worse: " + (", ".join(mv["made_worse"]) or "none"))
    if c.diagnostics is not None:
        d = c.diagnostics
        out.append(f"per pair: change = {d['slope']:+.2f} × difference before (corr {d['corr']:+.2f}); "
                   "a slope near −1 shrinks each pair's bias, near 0 shifts all pairs alike")
    return out
