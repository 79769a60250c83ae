"""`edge report -o DIR`: a static HTML page of bench results and latency logs over time.

Reads the run log (or given bench JSONL files), writes DIR/index.html and PNG plots
beside it. Every file is written atomically; the page has no external resources, so it
opens from a Pi's SD card, an artifact store or a mail attachment alike.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge import __version__
from edge.errors import BadOptionError, EdgeError
from edge.paths import atomic_write
from edge.report import plots
from edge.report.template import render
from edge.telemetry import audit_figures, estimate_text


class EmptyReportError(EdgeError):
    """Nothing to report: no bench, latency or fairness records."""


@dataclass
class ReportResult:
    out_dir: Path
    index: Path
    images: list[str] = field(default_factory=list)
    n_bench: int = 0
    n_latency: int = 0
    n_fairness: int = 0


def _engine(rec: dict[str, Any]) -> str:
    """llama, native (+ its quantized rows' format), + the sparse profile's name and sparsity:
    llama.cpp and the native sparse engine on the same model sit side by side."""
    c = rec.get("config") or {}
    sp = c.get("sparse_profile")
    engine = c.get("engine") or ("native" if sp else "llama")
    if c.get("native_weights"):
        engine += f" {c['native_weights']}"
    if not sp:
        return engine
    name = Path(str(sp.get("path", "profile"))).name
    return f"{engine} sparse {100 * (sp.get('sparsity') or 0):.0f}% ({name})"


def _key(rec: dict[str, Any]) -> tuple[Any, ...]:
    from edge.bench.compare import test_key

    # the run log can hold the same test from both engines: each keeps its own row
    return (*test_key(rec), _engine(rec))


def _latest_per_test(bench: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[tuple, dict[str, Any]] = {}
    for r in sorted(bench, key=lambda r: r["ts"]):
        latest[_key(r)] = r
    return sorted(latest.values(), key=lambda r: (_key(r)[0], _key(r)[1], _key(r)[2]))


def _temp(rec: dict[str, Any], when: str) -> float | None:
    return ((rec["metrics"].get(f"state_{when}") or {}).get("temp_c"))


def _bench_rows(latest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in latest:
        m, model = r["metrics"], r.get("model") or {}
        rows.append({
            "when": r["ts"][:16].replace("T", " "),
            "model": plots.series_label(r).rsplit(" t=", 1)[0] + ("" if _engine(r) == "llama" else f" · {_engine(r)}"),
            "threads": r.get("config", {}).get("threads"), "test": m.get("test", ""),
            "pp": f"{m['pp_tps']:.2f} ± {m.get('pp_tps_std') or 0:.2f}",
            "tg": f"{m['tg_tps']:.2f} ± {m.get('tg_tps_std') or 0:.2f}",
            "ttft": f"{m['ttft_ms']:.0f}" if m.get("ttft_ms") is not None else "-",
            "rss": f"{m['peak_rss_bytes'] / 2**20:.0f}" if m.get("peak_rss_bytes") else "-",
            "temp": " → ".join(f"{t:.1f}" if t is not None else "?" for t in (_temp(r, "before"), _temp(r, "after"))),
            "throttled": {True: "THROTTLED", False: "no", None: "n/a"}[m.get("throttled")],
            "board": (r.get("device") or {}).get("board") or (r.get("device") or {}).get("cpu") or "-",
            "quant": model.get("quant"),
        })
    return rows


def _latency_rows(latency: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in latency:
        model = r.get("model") or {}
        groups[(r["metrics"].get("command", "?"), f"{model.get('name') or '?'} {model.get('quant') or ''}")].append(r)
    rows = []
    for (command, model), recs in sorted(groups.items()):
        def med(k: str, recs: list[dict[str, Any]] = recs) -> str:
            vals = sorted(r["metrics"][k] for r in recs if r["metrics"].get(k))
            return f"{vals[len(vals) // 2]:.1f}" if vals else "-"
        rows.append({"command": command, "model": model.strip(), "n": len(recs), "gen_tps": med("gen_tps"),
                     "prompt_tps": med("prompt_tps"), "ttft": med("ttft_ms"),
                     "last": recs[-1]["ts"][:16].replace("T", " ")})
    return rows


def _est(e: dict[str, Any] | None, fmt: str = ".1f") -> str:
    return estimate_text(e, fmt, missing="–")


def _spread(figs: dict[str, Any], key: str, fmt: str = ".1f", unit: str = "") -> str:
    f = figs.get(key)
    if not f:
        return "–"
    if f["n"] == 1:
        return f"{f['median']:{fmt}}{unit}"
    return f"{f['median']:{fmt}}{unit} ({f['min']:{fmt}} to {f['max']:{fmt}})"


def _model_name(rec: dict[str, Any]) -> str:
    m = rec.get("model") or {}
    return f"{m.get('name') or '?'} {m.get('quant') or ''}".strip()


def _fairness_rows(fair: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(audits, corrections), latest first: an audit's pct and mean with CIs; a correction's
    held-out pct before → after (a split run: median and range), PPL rise and checks passed."""
    audits: list[dict[str, Any]] = []
    fixes: list[dict[str, Any]] = []
    for r in fair:
        with suppress(KeyError, TypeError, ValueError):  # a record of another shape: left out, not a crash
            _fairness_row(r, audits, fixes)
    return audits[::-1], fixes[::-1]


def _fairness_row(r: dict[str, Any], audits: list[dict[str, Any]], fixes: list[dict[str, Any]]) -> None:
    """Append r's row to the audits or the corrections (other fairness records: none)."""
    m, when = r.get("metrics", {}), r["ts"][:16].replace("T", " ")
    if m.get("command") == "bias audit":
        o, corr = m.get("overall", {}), (r.get("config") or {}).get("correction")
        audits.append({"when": when, "model": _model_name(r), "suite": m.get("suite"), "n": m.get("n_items"),
                       "correction": Path(str(corr)).name if corr else "none",
                       "figures": audit_figures(o)})
    elif m.get("command") == "bias mitigate" and "method" in m:
        f, c = m.get("figures", {}), m.get("checks", {})
        fixes.append({"when": when, "model": _model_name(r), "method": m["method"],
                      "splits": f"{m.get('splits')}/{m.get('of')}" + ("" if m.get("complete") else " (stopped)"),
                      "before": _spread(f, "heldout_pct_before"), "after": _spread(f, "heldout_pct_after"),
                      "ppl": _spread(f, "ppl_increase_pct", "+.2f", "%"),
                      "holds50": c.get("ci_contains_50_after_excluded_before", "–"),
                      "significant": c.get("paired_change_significant", "–"),
                      "bbq": c.get("bbq_acc_drop_le_1pt", "–")})
    elif m.get("command") == "bias mitigate":  # one split of the control-vector loop
        h, ppl = m.get("heldout") or {}, m.get("ppl") or {}
        fixes.append({"when": when, "model": _model_name(r), "method": "steer", "splits": "1/1",
                      "before": _est(h.get("before", {}).get("pct_stereotype")),
                      "after": _est(h.get("after", {}).get("pct_stereotype")),
                      "ppl": f"{100 * ppl['increase']:+.2f}%" if ppl.get("increase") is not None else "–",
                      "holds50": "–", "significant": "–", "bbq": "–"})


def _audit_series(rec: dict[str, Any]) -> str:
    # the item count is part of the series: a --limit audit scores other rows than a full one
    corr, m = (rec.get("config") or {}).get("correction"), rec["metrics"]
    return (f"{m.get('suite')} ({m.get('n_items', '?')} items): {_model_name(rec)[:40]}"
            + (f" + {Path(str(corr)).name}" if corr else ""))


def _audit_pct(rec: dict[str, Any]) -> float | None:
    m = rec.get("metrics", {})
    if m.get("command") != "bias audit":
        return None
    return (m.get("overall", {}).get("pct_stereotype") or {}).get("value")


def build_report(out_dir: Path, *, bench: Sequence[dict[str, Any]] | None = None,
                 latency: Sequence[dict[str, Any]] | None = None, fairness: Sequence[dict[str, Any]] | None = None,
                 since: datetime | None = None, title: str = "edge report") -> ReportResult:
    """Write DIR/index.html and its plots from bench, latency and fairness records (default:
    the run log)."""
    from edge.telemetry import read_records

    if bench is None:
        bench = read_records("bench", since).records
    if latency is None:
        latency = read_records("latency", since).records
    if fairness is None:
        fairness = read_records("fairness", since).records
    bench, latency, fairness = list(bench), list(latency), list(fairness)
    profiles = tune_profiles()
    if not bench and not latency and not fairness and not profiles:
        raise EmptyReportError("no bench, latency or fairness records to report; run `edge bench`, `edge run` "
                               "or `edge bias audit` first, or pass bench files with --from")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadOptionError(f"-o {out_dir} is a file; give a directory for the report")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadOptionError(f"cannot create {out_dir} ({e.strerror or e}); choose another -o") from None
    images: list[dict[str, str]] = []

    def add(name: str | None, caption: str) -> None:
        if name:
            images.append({"file": name, "caption": caption})

    latest = _latest_per_test(bench)
    if latest:
        add(plots.tps_bars(latest, out_dir / "tps.png"),
            "Tokens/s by model, quant type and threads (latest test of each; bars: mean, whiskers: std)")
        add(plots.over_time(bench, lambda r: r["metrics"].get("tg_tps"), "tokens/s",
                            "generation (tg) t/s over time", out_dir / "tg_over_time.png"), "tg t/s over time")
        add(plots.over_time(bench, lambda r: _temp(r, "after"), "°C", "SoC temperature after each test",
                            out_dir / "temperature.png"), "SoC temperature after each test")
    for i, prof in enumerate(profiles):
        add(plots.tune_frontier(prof, out_dir / f"tune_{i}.png"),
            f"edge tune ({prof['objective']}, --max-kld {prof['max_kld']}): {Path(prof['model']).name}, "
            f"chosen {prof['winner']['quant']} with {prof['winner']['threads']} threads")
    both = bench + latency
    add(plots.over_time(both, lambda r: r["metrics"].get("ttft_ms"), "ms", "time to first token",
                        out_dir / "ttft.png", group=_group), "Time to first token (bench and run/chat logs)")
    add(plots.over_time(both, lambda r: (r["metrics"].get("peak_rss_bytes") or 0) / 2**20 or None, "MiB",
                        "peak resident memory", out_dir / "rss.png", group=_group), "Peak RSS")
    add(plots.over_time(fairness, _audit_pct, "pct_stereotype", "bias audits: share of pairs where the "
                        "stereotype is more likely", out_dir / "fairness.png", group=_audit_series,
                        ref=(50.0, "50: unbiased")),
        "edge bias audit's pct_stereotype over time, per suite, model and correction (CIs in the table)")
    audits, fixes = _fairness_rows(fairness)
    html = render(title=title, generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  version=__version__, bench_rows=_bench_rows(latest), latency_rows=_latency_rows(latency),
                  audit_rows=audits, fix_rows=fixes, images=images, n_bench=len(bench), n_latency=len(latency),
                  n_fairness=len(fairness))
    index = out_dir / "index.html"
    with atomic_write(index, "w") as f:
        f.write(html)
    _readable(out_dir, ["index.html", *(i["file"] for i in images)])
    return ReportResult(out_dir, index, [i["file"] for i in images], len(bench), len(latency), len(fairness))


def tune_profiles() -> list[dict[str, Any]]:
    """This device's `edge tune` profiles (raw dicts: the report only plots them)."""
    import json

    from edge.paths import edge_home
    from edge.tune.profile import device_key

    out = []
    for path in sorted((edge_home() / "tune" / device_key()).glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("frontier"):
            out.append(d)
    return out


def _readable(out_dir: Path, names: list[str]) -> None:
    # atomic_write's temp files are 0600; a report is meant to be served and shared.
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(out_dir / name, 0o666 & ~umask)


def _group(rec: dict[str, Any]) -> str:
    # bench: one line per model / quant / threads; logs: one per command and model
    if rec.get("kind") == "bench":
        return f"bench: {plots.series_label(rec)}"
    model = rec.get("model") or {}
    what = rec.get("metrics", {}).get("command", rec.get("kind"))
    return f"{what}: {(model.get('name') or '?')[:24]} {model.get('quant') or ''}".strip()
