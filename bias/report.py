"""Audit reports: results.json, report.md, report.html with PNG plots of per-category CIs."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from bias.audit import AuditResult
from bias.metrics import Estimate
from bias.repeat import RepeatResult
from edge.paths import atomic_write
from edge.telemetry import AUDIT_FIGURES, estimate_text

# The metric each plot shows first, and the value an unbiased model would score.
HEADLINE = {"pairs": ("pct_stereotype", 50.0), "bbq": ("s_dis", 0.0), "stereoset": ("ss", 50.0)}
# One plot per entry; a tuple overlays metrics of one unit (a figure and its parts).
PLOTS: dict[str, list[tuple[str, ...]]] = {
    "pairs": [("pct_stereotype", "rest_pct_stereotype"), ("mean_ll_diff", "words_ll_diff", "rest_ll_diff")],
    "bbq": [("s_dis",), ("s_amb",), ("acc_dis",)], "stereoset": [("ss",), ("icat",)]}
UNBIASED = {"pct_stereotype": 50.0, "mean_ll_diff": 0.0, "s_dis": 0.0, "s_amb": 0.0, "ss": 50.0}
LABELS = {"pct_stereotype": "whole sentence", "rest_pct_stereotype": "shared tokens only",
          "mean_ll_diff": "whole sentence", "words_ll_diff": "rewritten tokens", "rest_ll_diff": "shared tokens"}
PAIR_PARTS_NOTE = ("mean_ll_diff = words_ll_diff + rest_ll_diff: the rewritten tokens' own log-probability "
                   "(how likely the model finds the group word in its place: its rarity, and whatever "
                   "the words before it carry) and that of the tokens the two sentences share (how the "
                   "sentence goes on around the group). rest_pct_stereotype counts the pairs on the "
                   "shared tokens alone, as the CrowS-Pairs authors count. A words part far from 0 with "
                   "the rest near 0 is mostly word frequency.")


BBQ_N_NOTE = ("Each BBQ question comes in an ambiguous and a disambiguated context: n counts the items of "
              "one condition, and each figure is read on its own condition (acc_amb, s_amb on the ambiguous "
              "half; acc_dis, s_dis on the disambiguated half).")


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells, each column padded to its widest cell (the last one left as is)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
            for r in rows]


def category_lines(res: AuditResult) -> list[str]:
    """Per category, the audit's two main figures with their CIs, for the terminal; a `*` marks a
    CI that excludes the unbiased value, so a reader sees which categories the suite finds biased."""
    keys = [(k, label, f) for k, label, f in AUDIT_FIGURES if k in res.overall][:2]
    if not res.per_category or not keys:
        return []

    def cell(e: Estimate, k: str, f: str) -> str:
        u = UNBIASED.get(k)
        off = u is not None and not e.lo <= u <= e.hi
        signed = "+" if u == 0.0 else ""  # a difference or a score around 0: its sign is its side
        return estimate_text(e.to_dict(), signed + f) + (" *" if off else "")

    rows = [["", "n", *(k for k, _, _ in keys), ""]]
    for cat, m in res.per_category.items():
        rows.append([cat, str(m[keys[0][0]].n), *(cell(m[k], k, f) for k, _, f in keys), ""])
    marked = [k for k, _, _ in keys if k in UNBIASED]
    head = "per category, 95% CIs" + (
        f"; * where a CI excludes the unbiased value ({', '.join(f'{k} {UNBIASED[k]:g}' for k in marked)})"
        if marked else "") + ":"
    return [head, *text_table(rows)]


def _fmt(e: Estimate) -> str:
    return f"{e.value:.3g} [{e.lo:.3g}, {e.hi:.3g}]"


def plot_metric(res: AuditResult, metrics: tuple[str, ...], path: Path) -> Path:
    """Per category, each metric's value and CI; several metrics side by side on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(res.per_category)
    labels = [*cats, "ALL"]
    fig, ax = plt.subplots(figsize=(7, (0.45 + 0.15 * (len(metrics) - 1)) * len(labels) + 1.2), dpi=110)
    ys = list(range(len(labels)))[::-1]
    colors = ["#1f4e79", "#d98c1f", "#3a9a5b"]
    for j, metric in enumerate(metrics):
        ests = [res.per_category[c][metric] for c in cats] + [res.overall[metric]]
        off = 0.22 * (j - (len(metrics) - 1) / 2) * (len(metrics) > 1)
        for k, (y, e) in enumerate(zip(ys, ests, strict=True)):
            color = colors[j] if len(metrics) > 1 else ("#1f4e79" if labels[k] == "ALL" else "#4a90c2")
            ax.errorbar(e.value, y - off, xerr=[[e.value - e.lo], [e.hi - e.value]], fmt="o", color=color,
                        capsize=3, ms=4 if len(metrics) > 1 else 6,
                        label=LABELS.get(metric, metric) if k == 0 and len(metrics) > 1 else None)
    if metrics[0] in UNBIASED:
        ax.axvline(UNBIASED[metrics[0]], color="#999", ls="--", lw=1, label="unbiased")
    if ax.get_legend_handles_labels()[1]:  # one metric without a neutral line (accuracy) has none
        ax.legend(loc="lower right", fontsize=8)
    ns = [res.per_category[c][metrics[0]].n for c in cats] + [res.overall[metrics[0]].n]
    ax.set_yticks(ys, [f"{lab} (n={n})" for lab, n in zip(labels, ns, strict=True)], fontsize=8)
    ax.set_xlabel(f"{metrics[0]} (95% bootstrap CI)")
    ax.set_title(f"{res.suite}: {metrics[0]} by category", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def compute_note(c: dict[str, Any]) -> str:
    """"f16 copy of the Q4_1 weights, rows unaligned (row-offset shift 0.007 nats)"."""
    if not c:
        return "the model file"
    what = (f"an f16 copy of the {c.get('source_type')} weights" if c.get("precision") == "f16"
            else f"the file's own {c.get('source_type')} kernels")
    if "align" in c:
        what += (f"; rows aligned mod {c['align']}" if c["align"] > 1 else "; rows unaligned") + \
            f" (row-offset shift {c['max_shift_nats']:.3g} nats)"
    return what


def markdown(res: AuditResult, meta: dict[str, Any]) -> str:
    metrics = list(res.overall)
    lines = [f"# Bias audit: {res.suite}", "",
             f"- model: `{meta.get('model', '?')}`",
             f"- source: `{res.source}` ({res.n_items} items, {res.skipped_rows} malformed rows skipped)",
             f"- correction: {res.correction or 'none'}"
             + (f" (scale {res.correction_scale})" if res.correction else ""),
             f"- scored with: {compute_note(res.compute)}",
             f"- scoring time: {res.score_s:.1f} s, {res.tokens_decoded} tokens decoded", "",
             "Values with 95% percentile-bootstrap confidence intervals.", "",
             *([PAIR_PARTS_NOTE, ""] if "words_ll_diff" in res.overall else []),
             *([BBQ_N_NOTE, ""] if res.kind == "bbq" else []),
             "| category | n | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for cat, ms in [*res.per_category.items(), ("**ALL**", res.overall)]:
        n = next(iter(ms.values())).n
        lines.append(f"| {cat} | {n} | " + " | ".join(_fmt(ms[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


# ---- repeated sampling (edge bias audit --repeat K --temp T) ---------------------------
def plot_repeat(rep: RepeatResult, path: Path) -> Path:
    """Stereotype rate per repeat index with its 95% CI band; overall and greedy as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, rep.repeat + 1))
    r = [e["stereo_rate"] for e in rep.per_repeat]
    fig, ax = plt.subplots(figsize=(8.5, 3.8), dpi=110)
    ax.fill_between(ks, [e.lo for e in r], [e.hi for e in r], color="#4a90c2", alpha=0.25,
                    label="95% CI (bootstrap over prompts)")
    ax.errorbar(ks, [e.value for e in r], yerr=[[e.value - e.lo for e in r], [e.hi - e.value for e in r]],
                fmt="o-", color="#1f4e79", capsize=3, label="stereotype rate at repeat k")
    o = rep.overall["stereo_rate"]
    ax.axhline(o.value, color="#1f4e79", ls=":", lw=1.2, label=f"overall {o.value:.3f}")
    if rep.greedy:
        g = rep.greedy["stereo_rate"]
        ax.axhline(g.value, color="#c0504d", ls="-.", lw=1.2, label=f"greedy (T=0) {g.value:.3f}")
    ax.axhline(0.5, color="#999", ls="--", lw=1, label="unbiased 0.5")
    ax.set_ylim(-0.03, 1.03)  # a rate of exactly 0 or 1 stays visible
    ax.set_xticks(ks)
    ax.set_xlabel(f"repeat index k (seed {rep.seed}+k−1, T={rep.temp})")
    ax.set_ylabel("stereotyped / decided answers")
    tr = rep.overall.get("trend")
    ax.set_title(f"probes: stereotype rate over {rep.repeat} repeats ({rep.n_items} prompts)"
                 + (f"; trend {tr.value:+.3f}/repeat [{tr.lo:+.3f}, {tr.hi:+.3f}]" if tr else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: never hides data
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def _repeat_rows(rep: RepeatResult) -> list[tuple[str, dict[str, Estimate]]]:
    rows = [(f"k={k + 1} (seed {rep.seed + k})", e) for k, e in enumerate(rep.per_repeat)]
    rows += [(f"all {rep.repeat} repeats", rep.overall)]
    rows += [("greedy (T=0)", rep.greedy)] if rep.greedy else []
    return rows + [(f"category {c}", e) for c, e in rep.per_category.items()]


def repeat_markdown(rep: RepeatResult) -> str:
    tr = rep.overall.get("trend")
    lines = [f"## Repeated sampling: {rep.repeat} × {rep.n_items} cloze prompts at T={rep.temp}", "",
             f"Stereotype rate = stereotyped / decided answers (0.5 = unbiased); neither = share of "
             f"answers naming both or no option. Max {rep.max_tokens} tokens, "
             f"{rep.gen_s:.1f} s, {rep.tokens_generated} tokens generated."
             + (f" Trend (slope per repeat): {_fmt(tr)}." if tr else ""), "",
             "| | stereotype rate | neither rate |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(e['stereo_rate'])} | {_fmt(e['neither_rate'])} |"
              for name, e in _repeat_rows(rep)]
    return "\n".join(lines) + "\n"


def repeat_html(rep: RepeatResult, png: str) -> str:
    tr = rep.overall.get("trend")
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{_fmt(e['stereo_rate'])}</td>"
                   f"<td>{_fmt(e['neither_rate'])}</td></tr>" for n, e in _repeat_rows(rep))
    return (f"<h2>Repeated sampling: {rep.repeat} × {rep.n_items} cloze prompts at T={rep.temp}</h2>"
            f"<p>Stereotype rate = stereotyped / decided answers (0.5 = unbiased); neither = share "
            f"of answers naming both or no option."
            + (f" Trend (slope per repeat): {_fmt(tr)}." if tr else "") + "</p>"
            f"<table><tr><th></th><th>stereotype rate</th><th>neither rate</th></tr>{rows}</table>"
            f'<img class="wide" src="{png}" alt="repeat">')


def write_report(res: AuditResult, out: Path, meta: dict[str, Any],
                 repeat: RepeatResult | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for ms in PLOTS[res.kind]:
        ms = tuple(m for m in ms if m in res.overall)
        if ms:
            pngs.append(plot_metric(res, ms, out / f"{ms[0]}.png"))
    rep_png = plot_repeat(repeat, out / "repeat.png") if repeat else None
    with atomic_write(out / "results.json", "w") as f:
        json.dump(meta | res.to_dict() | ({"repeat": repeat.to_dict()} if repeat else {}), f, indent=1)
    md = markdown(res, meta) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    if repeat and rep_png:
        md += "\n" + repeat_markdown(repeat) + f"\n![repeat]({rep_png.name})\n"
    with atomic_write(out / "report.md", "w") as f:
        f.write(md)
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{next(iter(ms.values())).n}</td>"
        + "".join(f"<td>{_fmt(ms[m])}</td>" for m in res.overall) + "</tr>"
        for c, ms in [*res.per_category.items(), ("ALL", res.overall)])
    head = "".join(f"<th>{m}</th>" for m in res.overall)
    imgs = "".join(f'<img src="{p.name}" alt="{p.stem}">' for p in pngs)
    rep_html = repeat_html(repeat, rep_png.name) if repeat and rep_png else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edge bias audit: {res.suite}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:48%;margin:4px;vertical-align:top}}img.wide{{max-width:100%}}</style></head>
<body><h1>Bias audit: {html.escape(res.suite)}</h1>
<p>Model <code>{html.escape(str(meta.get('model')))}</code>; {res.n_items} items from
<code>{html.escape(res.source)}</code> ({res.skipped_rows} malformed rows skipped); correction:
{html.escape(res.correction or 'none')}; scored with {html.escape(compute_note(res.compute))}.
95% percentile-bootstrap confidence intervals.</p>
{f"<p>{html.escape(PAIR_PARTS_NOTE)}</p>" if "words_ll_diff" in res.overall else ""}
{f"<p>{html.escape(BBQ_N_NOTE)}</p>" if res.kind == "bbq" else ""}
<table><tr><th>category</th><th>n</th>{head}</tr>{rows}</table>{imgs}{rep_html}</body></html>
"""
    with atomic_write(out / "report.html", "w") as f:
        f.write(page)
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "results.json"}
