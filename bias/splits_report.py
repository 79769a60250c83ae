"""report.md of a split run (bias.splits): the acceptance table, per split and method,
then the median and range of each figure and how many splits pass each check; a plot of
each method's categories before and after, and the same report as report.html."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bias.feedback import NOTHING_KEPT
from bias.metrics import PPL_TOKENS
from edge.paths import atomic_write


def _e(x: dict[str, Any], f: str = ".1f") -> str:
    return f"{x['value']:{f}} [{x['lo']:{f}}, {x['hi']:{f}}]"


def _row(seed: int, method: str, r: dict[str, Any]) -> str:
    p = r["heldout"]["pct_stereotype"]
    dg = r["heldout"]["diagnostics"]
    cm = r["categories"]
    cells = [str(seed), method, _e(p["before"]), _e(p["after"]), _e(p["change"], "+.1f"),
             f"{dg['slope']:+.2f} / {dg['corr']:+.2f}", f"{100 * r['ppl']['increase']:+.2f}%"]
    b = r.get("bbq")
    cells.append(f"{100 * b['acc_dis']['change']['value']:+.1f} [{100 * b['acc_dis']['change']['lo']:+.1f}, "
                 f"{100 * b['acc_dis']['change']['hi']:+.1f}]" if b else "–")
    cells.append(_e(b["s_amb"]["after"], ".3f") if b else "–")
    moved = f"{len(cm['moved_toward_neutral'])}/{len(cm['biased_before'])}"
    cells.append(f"{moved}; worse: {', '.join(cm['made_worse']) or 'none'}")
    k = r.get("kept_out")
    cells.append(_e(k["pct_stereotype"]["change"], "+.1f") if k else "–")
    g = r.get("generation")
    cells.append(f"{_e(g['before'], '.3f')} → {_e(g['after'], '.3f')}" if g else "–")
    return "| " + " | ".join(cells) + " |"


def _kept(sh: dict[str, Any]) -> str:
    k = sh.get("kept_from_earlier_run")
    if not k:
        return ""
    n = k["results"]
    return f" ({n} split result{'' if n == 1 else 's'} and {k['elapsed_s']:.0f} s from an earlier run of the same command)"


def report_md(res: dict[str, Any], images: list[str] | tuple[str, ...] = ()) -> str:
    """`images`: plots beside the report (category_plot's), shown after the category tables."""
    cfg = res["config"]
    sh = res.get("shared", {})
    lines = [f"# Bias mitigation on {_splits(cfg['n_splits'])} ({', '.join(cfg['methods'])})", "",
             f"Calibration fraction {cfg['calib_frac']}, kept out: {cfg['exclude_category'] or 'none'}, "
             f"PPL budget {100 * cfg['max_ppl_increase']:.0f}% on {cfg.get('ppl_tokens', PPL_TOKENS)} tokens of "
             f"neutral text; shared work {sh.get('seconds', 0):.0f} s, "
             f"splits {res.get('elapsed_s', 0):.0f} s{_kept(sh)}{'' if res.get('complete') else ' (interrupted)'}.",
             "",
             *_learn_settings(res),
             "| seed | method | held-out pct before | after | paired change | pair slope / corr | ΔPPL | "
             "BBQ acc_dis Δ (pts) | BBQ s_amb after | categories moved; worse | kept-out Δpct | generation rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["splits"]:
        for m, r in s["methods"].items():
            lines.append(_row(s["seed"], m, r))
    lines += ["", *_summary_tables(res)]
    lines += _category_lines(res)
    lines += [*(f"![{Path(n).stem}]({n})" for n in images), ""] if images else []
    lines += _deployed(res)
    if res["splits"]:
        first = next(iter(res["splits"][0]["methods"].values()), None)
        if first:
            pw = [f"CrowS pct ±{first['heldout']['pct_stereotype']['power']:.2f} points"]
            if "bbq" in first:
                pw.append(f"BBQ s_amb ±{first['bbq']['s_amb']['power']:.3f}")
            if "generation" in first:
                pw.append(f"generation rate ±{first['generation']['power']:.3f}")
            lines.append("Power (smallest bias detectable at 95% with 80% power, split 0): " + "; ".join(pw) + ".")
        lines += _bbq_resolution(res)
    return "\n".join(lines) + "\n"


# What each of bias.splits' FIGURES and CHECKS reads, for the report; results.json keeps the keys.
FIGURE_LABELS = {
    "heldout_pct_before": "held-out pct, before",
    "heldout_pct_after": "held-out pct, after",
    "heldout_pct_change": "held-out pct, paired change (points)",
    "heldout_mean_ll_diff_change": "held-out mean ll difference, change (nats)",
    "heldout_words_part_change": "held-out mean ll difference, change: rewritten tokens' part",
    "heldout_rest_part_change": "held-out mean ll difference, change: shared tokens' part",
    "heldout_rest_pct_before": "held-out pct on the shared tokens, before",
    "heldout_rest_pct_after": "held-out pct on the shared tokens, after",
    "pair_slope": "per pair: slope of the change on the difference before",
    "pair_corr": "per pair: correlation of the change with the difference before",
    "ppl_increase_pct": "PPL on neutral text, increase (%)",
    "bbq_acc_dis_change_points": "BBQ disambiguated accuracy, change (points)",
    "bbq_s_amb_after": "BBQ ambiguous bias score, after",
    "gen_stereo_rate_after": "generation: stereotype rate, after",
    "kept_out_pct_change": "kept-out category's pct, change (points)",
}
# Decimals a figure is shown with, by its unit: one spread reads in one scale
# (":.3g" gave "-0.28 [-0.746, -0.0933]" and "-9.15e-05").
FIGURE_DECIMALS = {
    "heldout_pct_before": 1, "heldout_pct_after": 1, "heldout_pct_change": 2,
    "heldout_mean_ll_diff_change": 3, "heldout_words_part_change": 3, "heldout_rest_part_change": 3,
    "heldout_rest_pct_before": 1, "heldout_rest_pct_after": 1, "pair_slope": 3, "pair_corr": 3,
    "ppl_increase_pct": 2, "bbq_acc_dis_change_points": 2, "bbq_s_amb_after": 3,
    "gen_stereo_rate_after": 3, "kept_out_pct_change": 2,
}
CHECK_LABELS = {
    "ci_contains_50_after_excluded_before": "held-out pct CI excluded 50 before and holds it after",
    "paired_change_significant": "the paired change is significant, toward 50",
    "no_category_made_worse": "no category made significantly worse (any category)",
    "no_biased_category_made_worse": "no category biased before made significantly worse",
    "biased_categories_moved": "every category biased before moved toward neutral (its change's CI)",
    "biased_categories_closer": "every category biased before ended nearer neutral (point estimate)",
    "no_biased_category_made_worse_pct": "by category pct: no category biased before made significantly worse",
    "biased_categories_moved_pct": "by category pct: every biased category moved toward 50 (change CI)",
    "biased_categories_closer_pct": "by category pct: every biased category ended nearer 50 (point est.)",
    "ppl_within_budget": "PPL on neutral text rose at most 2%",
    "bbq_acc_drop_le_1pt": "BBQ disambiguated accuracy fell at most 1 point",
    "kept_out_not_worse": "the kept-out category is not worse",
    "shared_tokens_ci_contains_50_after_excluded_before": "shared tokens: pct CI excluded 50 before, holds it after",
    "shared_tokens_paired_change_significant": "shared tokens: the paired change is significant",
    "shared_tokens_no_category_made_worse": "shared tokens: no category made significantly worse",
    "shared_tokens_biased_categories_moved": "shared tokens: every biased category moved toward neutral",
}


def _summary_tables(res: dict[str, Any]) -> list[str]:
    """Each figure's median [min, max] over the splits and each check's splits passing, one
    column per method; a check some split missed is in bold, so the misses are read first."""
    rows = _check_rows(res.get("summary", {}), lambda v: f"**{v}**")
    if not rows:  # no method finished a split
        return []
    summ = {m: s for m, s in res["summary"].items() if s["splits"]}  # the methods rows[0] names

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"
    rule = "|---|" + "---|" * len(summ)
    lines = ["## Over splits (median [min, max])", "", "| " + row(rows[0][1:]), rule]  # an empty corner
    for k in dict.fromkeys(k for s in summ.values() for k in s["figures"]):
        cells = [_spread(s["figures"].get(k), s["splits"], FIGURE_DECIMALS.get(k)) for s in summ.values()]
        lines.append(row([FIGURE_LABELS.get(k, k), *cells]))
    lines += ["", "## Checks (splits passing)", "", row(rows[0]), rule, *map(row, rows[1:])]
    return [*lines, ""]


def _check_rows(summary: dict[str, dict[str, Any]], missed: Callable[[str], str]) -> list[list[str]]:
    """A head row (methods with their splits) and a row per check: its words, then each method's
    "k/n" splits passing, marked by `missed` where some split missed it ("–": not judged)."""
    summ = {m: s for m, s in summary.items() if s["splits"]}  # none: interrupted before it
    if not summ:
        return []
    rows = [["check", *(f"{m} ({_splits(s['splits'], '')})" for m, s in summ.items())]]
    for k in dict.fromkeys(k for s in summ.values() for k in s["checks"]):
        cells = []
        for s in summ.values():
            v = s["checks"].get(k)
            ok, _, n = (v or "").partition("/")
            cells.append("–" if v is None else v if ok == n else missed(v))
        rows.append([CHECK_LABELS.get(k, k), *cells])
    return rows


def _spread(v: dict[str, Any] | None, splits: int, decimals: int | None = None) -> str:
    """median [min, max], or the one value a figure measured on one split only has (generation)."""
    if v is None:
        return "–"
    spec = ".3g" if decimals is None else f".{decimals}f"

    def f(x: float) -> str:
        t = format(x, spec)
        return t[1:] if t.startswith("-") and float(t) == 0 else t  # no "-0.00"
    if v["n"] == 1:
        return f"{f(v['median'])} ({_splits(1, '')} of {splits})" if splits > 1 else f(v["median"])
    return f"{f(v['median'])} [{f(v['min'])}, {f(v['max'])}]" + (f" ({v['n']} of {splits})" if v["n"] < splits else "")


def _learn_settings(res: dict[str, Any]) -> list[str]:
    """learn's settings, which the table's figures depend on."""
    lc = res.get("shared", {}).get("learn_config")
    if "learn" not in res["config"]["methods"] or not lc:
        return []
    first = next((s["methods"]["learn"]["fit"].get("first_layer") for s in res["splits"]
                  if "learn" in s["methods"]), None)
    n = lc.get("layers")
    where = (f"layers {first}.." if first is not None else "the upper half of the layers" if n is None
             else "the last layer" if n == 1 else f"the top {n} layers")
    return [f"learn: objective {lc['objective']}, rank {lc['rank']} on {where}, {lc['steps']} steps "
            f"({lc['schedule']} rate, keeping the {'last' if lc['pick'] == 'last' else 'best validated'} step), "
            + ("one round." if lc["rounds"] == 1 else f"up to {lc['rounds']} rounds."), ""]


def _bbq_resolution(res: dict[str, Any]) -> list[str]:
    """How well the BBQ accuracy change is resolved, from the first split a correction
    changed (an uncorrected model's change is exactly 0, its CI too)."""
    runs = [(s["seed"], r) for s in res["splits"] for r in s["methods"].values() if "bbq" in r]
    if not runs:
        return []
    seed, r = next(((sd, r) for sd, r in runs if r["ppl"]["after"] != r["ppl"]["before"]), runs[0])
    ch = r["bbq"]["acc_dis"]["change"]
    return ["", f"BBQ disambiguated accuracy: the change is known to ±{50 * (ch['hi'] - ch['lo']):.1f} points "
            f"(half its 95% CI, seed {seed}), against the 1-point drop the check allows; --bbq-items sets the items."]


def _category_lines(res: dict[str, Any]) -> list[str]:
    """Per method and held-out category, over splits: pct and mean ll difference before →
    after (medians), and on how many splits the category was biased before, moved toward
    neutral, made worse (mean ll difference, as the checks: moved away, or pushed past
    neutral to a larger bias the other way), or made biased by pct (its CI
    held 50 before and not after): an overall pct can reach 50 by pushing a big category
    past neutral."""
    out: list[str] = []
    for m in res["config"]["methods"]:
        runs = [s["methods"][m] for s in res["splits"] if m in s.get("methods", {})]
        if not runs:
            continue
        parts = all("heldout_parts" in r for r in runs)
        out += ["", f"## Categories, {m} (held-out; median over {_splits(len(runs), '')})", ""]
        if parts:
            out += ["The mean ll difference is the rewritten tokens' part plus the shared tokens' part; the "
                    "CrowS-Pairs authors count the pct on the shared tokens alone. Which part a correction "
                    "moved says whether it changed how likely the group words are or what is said of them.", ""]
        out += ["A category counts as moved when its mean's change CI lies wholly on the neutral side, so the "
                "change must exceed about its ± (half that CI, median over splits): a small category needs "
                "a larger move.", "",
                "| category | pairs | pct before → after | mean ll diff before → after | change ± | "
                + "rewritten tokens | shared tokens | pct, shared tokens | " * parts
                + "biased before | moved | worse | made biased (pct) |",
                "|---|---|---|---|---|" + "---|---|---|" * parts + "---|---|---|---|"]
        made = made_biased(res, m)
        for c in sorted(runs[0]["heldout"]["per_category"]):
            js = [r["heldout"]["per_category"][c] for r in runs]
            med = {k: _medians([j[k] for j in js]) for k in ("pct_stereotype", "mean_ll_diff")}
            med |= {k: _medians([r["heldout_parts"][k][c] for r in runs]) for k in ("words", "rest", "rest_pct")
                    if parts}
            cm = [r["categories"] for r in runs]
            cells = [f"{med[k][0]:+.2f} → {med[k][1]:+.2f}" for k in ("mean_ll_diff", "words", "rest") if k in med]
            cells.insert(1, _change_half_width([j["mean_ll_diff"] for j in js]))
            if parts:
                cells.append(f"{med['rest_pct'][0]:.1f} → {med['rest_pct'][1]:.1f}")
            out.append(f"| {c} | {js[0]['pct_stereotype']['before']['n']} | "
                       f"{med['pct_stereotype'][0]:.1f} → {med['pct_stereotype'][1]:.1f} | {' | '.join(cells)} | "
                       f"{sum(c in x['biased_before'] for x in cm)} | {sum(c in x['moved_toward_neutral'] for x in cm)}"
                       f" | {sum(c in x['made_worse'] for x in cm)} | {made.get(c, 0)} |")
    return out + [""]


def _change_half_width(js: list[dict[str, Any]]) -> str:
    """Median over splits of half a judged figure's change CI: how far it must move to count."""
    h = [(j["change"]["hi"] - j["change"]["lo"]) / 2 for j in js if "change" in j]
    return f"±{float(np.median(h)):.2f}" if h else "–"


def _medians(js: list[dict[str, Any]]) -> tuple[float, float]:
    """Median over splits of a judged figure's value before and after."""
    return float(np.median([j["before"]["value"] for j in js])), float(np.median([j["after"]["value"] for j in js]))


def made_biased(res: dict[str, Any], method: str) -> dict[str, int]:
    """Per category, on how many splits `method` made it biased by pct."""
    out: dict[str, int] = {}
    for s in res["splits"]:
        r = s.get("methods", {}).get(method)
        for c, j in (r["heldout"]["per_category"].items() if r else ()):
            if _made_biased(j["pct_stereotype"]):
                out[c] = out.get(c, 0) + 1
    return out


def _made_biased(j: dict[str, Any]) -> bool:
    return bool(j["contains_after"] is False and j["excluded_before"] is False)


def _deployed(res: dict[str, Any]) -> list[str]:
    """What split 0's corrections were written as, and what re-quantizing the fold cost."""
    out = []
    for s in res["splits"][:1]:
        st = s["methods"].get("steer", {}).get("fit", {})
        if st.get("vector"):
            out.append(f"Split {s['seed']} control vector: {st['vector']}.")
        elif st.get("loop"):
            out.append(f"Split {s['seed']} steer: {NOTHING_KEPT}; "
                       "the uncorrected model was judged and no control vector was written.")
        abl = s["methods"].get("ablate", {}).get("fit", {})
        if abl and not abl.get("fold") and abl.get("loop", {}).get("best") is None:
            out.append(f"Split {s['seed']} ablate: no candidate lowered the calibration bias within the "
                       "PPL budget; the uncorrected model was judged and no ablated GGUF was written.")
        for m, what in (("ablate", "ablated"), ("gate", "gated"), ("combo", "combined (words + vector)"),
                          ("learn", "learned-edit"), ("erase", "erased-head")):
            fold = s["methods"].get(m, {}).get("fit", {}).get("fold")
            if fold:
                out.append(_fold_line(s["seed"], what, fold))
            dep = s["methods"].get(m, {}).get("deployed")
            if dep:
                eng = s["methods"][m].get("engine", "the engine")
                out.append(f"Split {s['seed']} {what} GGUF in plain llama.cpp: held-out pct {dep['pct_stereotype']:.2f} "
                           f"against {dep['engine_pct_stereotype']:.2f} in {eng}'s exact arithmetic (difference "
                           f"{dep['difference']:+.2f} points; the acceptance allows 0.5"
                           f"{', read in the file’s own arithmetic below' if 'device' in dep else ''}).")
                if "source_pct_stereotype" in dep:
                    out.append(f"The uncorrected source file in plain llama.cpp scores {dep['source_pct_stereotype']:.2f} "
                               f"against {dep['engine_before_pct_stereotype']:.2f} on the compute weights: its quantized "
                               "arithmetic alone moves pairs, so the file's own change, "
                               f"{dep['pct_stereotype'] - dep['source_pct_stereotype']:+.2f} points, is the one to set "
                               f"beside the engine's, {dep['engine_pct_stereotype'] - dep['engine_before_pct_stereotype']:+.2f} "
                               f"(difference {dep['change_difference']:+.2f}).")
                if "device" in dep:
                    b, a = dep["device"]["before"], dep["device"]["after"]
                    out.append(f"In llama.cpp's arithmetic on the file's weights (8-bit activations, reproduced in "
                               f"torch: bias.arith), two readings whose bits differ give the engine's pairs "
                               f"{b['expected_pct']:.2f} ± {b['pct_sd']:.2f} before and {a['expected_pct']:.2f} ± "
                               f"{a['pct_sd']:.2f} after (expected ± SD between draws). Only the noise's chaotic part, "
                               f"SD {a['chaotic_sd']:.2f} nats a pair, changes with the build, the CPU or a "
                               "re-quantization; "
                               f"this file is {dep['device_difference']:+.2f} points from its expected reading.")
            r = s["methods"].get(m, {})
            if r.get("engine", "llama.cpp") != "llama.cpp":
                bbq = r.get("bbq_engine") == r["engine"]
                out.append(f"{what.capitalize()} held-out pairs, PPL{' and BBQ' if bbq else ''}, before and after, "
                           f"are scored in {r['engine']} on the compute weights "
                           f"({'generation' if bbq else 'BBQ and generation'} in llama.cpp).")
    return out + [""] if out else out


def _fold_line(seed: int, what: str, fold: dict[str, Any]) -> str:
    w = fold["worst"]
    kind = ("re-quantized to the source's types" if fold["weight_type"] == "source"
            else f"kept at {fold['weight_type']}")
    n = len(fold["edited"])
    if n == 0:  # no tensor changed: a KL here would be the source's own quantization, not a re-quantization
        return f"Split {seed} {what} GGUF: {fold['path']} (no tensor edited: the source model's weights)."
    line = (f"Split {seed} {what} GGUF: {fold['path']} ({kind}; "
            f"{n} tensor{'s' if n != 1 else ''} edited: {', '.join(fold['edited'][:3])}"
            f"{', …' if n > 3 else ''}")
    if fold.get("untied_output"):
        line += "; the tied output head became its own output.weight"
    if w:
        line += f", worst tensor {w['name']} max error {w['max_err']:.2g} of its range"
    kl = fold.get("requant_kl")
    if kl:
        line += (f"; re-quantization cost against the fold the run scored (the edit at F16): KL {kl['kl_mean']:.4f} nats/token "
                 f"(p99 {kl['kl_p99']:.3f}), PPL {kl['ppl_full']:.3f} → {kl['ppl_quantized']:.3f}, "
                 f"top-1 agreement {100 * kl['top1_agreement']:.1f}%")
    return line + ")."


def _splits(n: int, kind: str = "seeded ") -> str:
    return f"{n} {kind}split{'s' if n != 1 else ''}"


def check_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The report's checks table for the terminal: a row per check in words, a column per
    method, `*` on a count some split missed, so the misses are read first."""
    from bias.report import text_table

    rows = _check_rows(summary, lambda v: f"{v} *")
    if not rows:
        return []
    rows[0][0] = "check: splits passing (* where a split missed)"
    return text_table([[*r, ""] for r in rows])


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The console summary of a split run: one line per split and method, then the checks."""
    out = []
    for s in res["splits"]:
        for m, r in s["methods"].items():
            p = r["heldout"]["pct_stereotype"]
            dg = r["heldout"]["diagnostics"]
            out.append(f"seed {s['seed']} {m:<6} held-out pct {_e(p['before'])} → {_e(p['after'])}, "
                       f"change {_e(p['change'], '+.1f')}, pair slope {dg['slope']:+.2f}, "
                       f"PPL {100 * r['ppl']['increase']:+.2f}%")
    out += check_table(res.get("summary", {}))
    for m, summ in res.get("summary", {}).items():
        made = made_biased(res, m)
        if made:
            out.append(f"{m}: made biased by pct (CI held 50 before, not after): "
                       + ", ".join(f"{c} on {k}/{summ['splits']}" for c, k in made.items()))
    out += [line for line in _deployed(res) if line]
    if not res.get("complete"):
        out.append("interrupted: results.json holds the finished splits")
    return out


# ---- pictures and a page -----------------------------------------------------------------
MOVE_COLORS = {"moved": "#2e8b57", "worse": "#c0392b", "other": "#1f4e79"}


def category_plot(res: dict[str, Any], method: str, path: Path) -> Path | None:
    """Per category, every split's held-out mean ll difference before (a ring, bold where its
    CI excluded 0) and after (a dot with its CI), joined by a line: green where the change's CI
    lies on the neutral side, red where it lies on the other, blue where it is not significant."""
    rows = [(s["seed"], s["methods"][method]["heldout"]["per_category"]) for s in res["splits"]
            if method in s["methods"] and "per_category" in s["methods"][method].get("heldout", {})]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(rows[0][1])
    kept = res["config"].get("exclude_category")
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(cats) * max(1, len(rows) / 3) + 1.4), dpi=110)
    step = 0.7 / max(1, len(rows))
    for k, (_, per) in enumerate(rows):
        for i, c in enumerate(cats):
            j = per.get(c, {}).get("mean_ll_diff")
            if not j:
                continue
            y = len(cats) - 1 - i + 0.35 - step * (k + 0.5)
            b, a = j["before"], j["after"]
            kind = "moved" if j.get("toward_neutral") else "worse" if j.get("away_from_neutral") else "other"
            col = MOVE_COLORS[kind]
            ax.plot([b["value"], a["value"]], [y, y], color=col, lw=1, alpha=0.7)
            biased = j.get("excluded_before", False)  # the categories the check asks to move
            ax.plot(b["value"], y, "o", mfc="white", mec="#000" if biased else "#999", mew=1.6 if biased else 1,
                    ms=5 if biased else 4)
            ax.errorbar(a["value"], y, xerr=[[a["value"] - a["lo"]], [a["hi"] - a["value"]]], fmt="o", color=col,
                        ms=4, capsize=2, lw=0.8)
    ax.axvline(0, color="#999", ls="--", lw=1)
    ax.set_yticks(range(len(cats))[::-1], [c + (" (kept out)" if c == kept else "") for c in cats], fontsize=8)
    for y in range(len(cats) - 1):
        ax.axhline(y + 0.5, color="#eee", lw=0.8)
    handles = [plt.Line2D([], [], marker="o", ls="", mfc="white", mec="#999", label="before"),
               plt.Line2D([], [], marker="o", ls="", mfc="white", mec="#000", mew=1.6, ms=5,
                          label="before, biased (CI excluded 0)"),
               *(plt.Line2D([], [], marker="o", color=MOVE_COLORS[k], label=lab) for k, lab in
                 (("moved", "after: moved toward 0 (CI)"), ("worse", "after: moved away (CI)"),
                  ("other", "after: no significant change")))]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    ax.set_xlabel("held-out mean ll difference, nats (0: no preference; after with its 95% CI)", fontsize=8)
    seeds = ", ".join(str(s) for s, _ in rows)
    ax.set_title(f"{method}: each category before → after, one line per split (seeds {seeds}, top to bottom)",
                 fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def report_html(md: str, title: str) -> str:
    """report.md as a page: its headings, paragraphs, tables and images (the markdown this
    module writes, not markdown at large)."""
    def inline(t: str) -> str:
        t = html.escape(t, quote=False).replace("\\|", "|")  # markdown's escaped pipe, inside a cell or not
        t = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img src="\2" alt="\1">', t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)

    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, body = table[0], [r for r in table[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>'
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px}img{max-width:100%}"
            "</style></head><body>" + "\n".join(out) + "</body></html>")
