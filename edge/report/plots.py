"""PNG plots of bench and latency records (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edge.paths import atomic_write


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI, a Pi over ssh
    import matplotlib.pyplot as plt

    return plt


def _when(rec: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00"))


def series_label(rec: dict[str, Any]) -> str:
    model = rec.get("model") or {}
    name = model.get("name") or Path(str(model.get("path") or "?")).stem
    return f"{name[:28]} {model.get('quant') or ''} t={rec.get('config', {}).get('threads', '?')}".strip()


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    _plt().close(fig)
    return path.name


def tps_bars(latest: list[dict[str, Any]], path: Path) -> str:
    """pp and tg t/s (mean ± std) of the latest test per model / quant / threads."""
    plt = _plt()
    labels = [series_label(r) for r in latest]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(latest) + 2.2))
    for ax, key, title in ((axes[0], "pp_tps", "prompt processing (pp)"),
                           (axes[1], "tg_tps", "generation (tg)")):
        vals = [r["metrics"][key] for r in latest]
        errs = [r["metrics"].get(f"{key}_std") or 0 for r in latest]
        ax.barh(range(len(vals)), vals, xerr=errs, color="#3b7dd8" if key == "pp_tps" else "#e07b39")
        ax.set_yticks(range(len(vals)), labels if ax is axes[0] else [""] * len(vals), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def over_time(records: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None],
              ylabel: str, title: str, path: Path, group: Callable[[dict[str, Any]], str] = series_label,
              ref: tuple[float, str] | None = None) -> str | None:
    """One line per group (model / quant / threads, or command) of `value` against time;
    `ref` (value, label) draws a dashed reference line (e.g. 50 = unbiased)."""
    points: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for r in records:
        v = value(r)
        if v is not None:
            points[group(r)].append((_when(r), float(v)))
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for label, pts in sorted(points.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=label)
    if ref is not None:
        ax.axhline(ref[0], color="#888", ls="--", lw=1, label=ref[1])
    _time_axis(ax, [p[0] for pts in points.values() for p in pts])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.autofmt_xdate()
    return _save(fig, path)


def _time_axis(ax: Any, times: list[datetime]) -> None:
    """Ticks that name dates or hours as the span needs. Left alone, matplotlib spreads one
    point (or a few minutes of them) over four years of empty axis."""
    import matplotlib.dates as mdates

    lo, hi = min(times), max(times)
    pad = max((hi - lo) * 0.05, timedelta(minutes=30))
    ax.set_xlim(lo - pad, hi + pad)
    loc = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))


def tune_frontier(profile: dict[str, Any], path: Path) -> str:
    """`edge tune`'s candidates: objective speed against KL to the source, marker area by
    the RAM each needs; the Pareto frontier joined, the defaults and the choice marked."""
    plt = _plt()
    obj = profile["objective"]
    pts = profile["frontier"]
    fig, ax = plt.subplots(figsize=(8, 5))
    mib = [p["required_bytes"] / 2**20 for p in pts]
    scale = 300 / max(mib) if mib else 1
    ax.scatter([p["kld"] for p in pts], [p[obj] for p in pts], s=[m * scale for m in mib], alpha=0.35,
               color="#3b7dd8", label="measured (area: RAM needed)")
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["kld"])
    ax.plot([p["kld"] for p in front], [p[obj] for p in front], color="#3b7dd8", lw=1, label="frontier")
    for tag, e, style in (("defaults", profile["defaults"], dict(marker="X", color="#d62728")),
                          ("chosen", profile["winner"], dict(marker="*", color="#2ca02c"))):
        ax.scatter([e["kld"]], [e[obj]], s=220, zorder=3, label=f"{tag}: {e['quant']} t{e['threads']}", **style)
    ax.axvline(profile["max_kld"], color="grey", ls="--", lw=1, label=f"--max-kld {profile['max_kld']}")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(left=0)  # KL ≥ 0; symlog would show an empty negative half
    ax.set_xlabel("mean KL to the source (nats)")
    ax.set_ylabel({"tg": "generation t/s", "pp": "prompt t/s", "ttft": "time to first token (ms)"}[obj])
    ax.set_title(f"edge tune: {Path(profile['model']).name}\non {profile['device']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
