"""The run log: one JSON object per line under $EDGE_HOME/logs/, append-only.

Each record is written with a single O_APPEND write() under an flock, so concurrent
processes never interleave or tear lines, and a crash loses at most the record being
written. Readers skip (and count) lines that do not parse.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge import __version__
from edge.device import probe_device
from edge.errors import BadOptionError
from edge.gguf_file import ModelInfo
from edge.paths import logs_dir

KINDS = ("latency", "fairness", "eval", "bench", "sparsity")


@lru_cache(maxsize=1)
def _device() -> dict[str, Any]:
    return probe_device().to_dict()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def model_record(info: ModelInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "path": info.path,
        "name": info.name,
        "sha256": info.fingerprint,  # of the first 16 MiB + size (see gguf_file.fingerprint)
        "size": info.file_size,
        "arch": info.arch,
        "params": info.params,
        "quant": info.quant,
    }


def make_record(
    kind: str,
    metrics: dict[str, Any],
    *,
    model: ModelInfo | None = None,
    config: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown telemetry kind {kind!r}")
    return {
        "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "run_id": run_id or new_run_id(),
        "kind": kind,
        "edge_version": __version__,
        "device": _device(),
        "model": model_record(model),
        "config": config or {},
        "metrics": metrics,
    }


def log_path(when: datetime | None = None) -> Path:
    when = when or datetime.now(timezone.utc)
    return logs_dir() / f"runs-{when:%Y-%m}.jsonl"


def append(record: dict[str, Any]) -> Path:
    """Append one record as one line; safe with many writers at once."""
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:  # a regular-file write is whole in practice; loop in case it is not
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)  # closing releases the lock
    return path


def latency_metrics(stats: Any, command: str) -> dict[str, Any]:
    """A GenerationStats as telemetry metrics: figures only, never the user's text."""
    d = stats.to_dict()
    d.pop("text", None)
    return {"command": command, **d}


def log(kind: str, metrics: dict[str, Any], **kw: Any) -> dict[str, Any]:
    rec = make_record(kind, metrics, **kw)
    append(rec)
    return rec


def estimate_text(e: dict[str, Any] | None, fmt: str = ".1f", missing: str = "?") -> str:
    """A logged estimate {value, lo, hi} as "value [lo, hi]" (the CI when it has one)."""
    if not isinstance(e, dict) or e.get("value") is None:
        return missing
    ci = f" [{e['lo']:{fmt}}, {e['hi']:{fmt}}]" if e.get("lo") is not None and e.get("hi") is not None else ""
    return f"{e['value']:{fmt}}{ci}"


# an audit's two main figures by suite: its bias figure, then the one to read beside it
# (pairs: pct, mean ll difference; StereoSet: ss, icat; BBQ has no pct: s_amb, acc_dis)
AUDIT_FIGURES = (("pct_stereotype", "pct", ".1f"), ("mean_ll_diff", "mean", ".2f"), ("ss", "ss", ".1f"),
                 ("icat", "icat", ".1f"), ("s_amb", "s_amb", ".3f"), ("acc_dis", "acc_dis", ".3f"))


def audit_figures(overall: dict[str, Any]) -> list[str]:
    """"pct 57.0 [50.5, 64.0]"-style texts of an audit's main figures (logged estimates)."""
    got = [f"{label} {estimate_text(overall[k], f)}" for k, label, f in AUDIT_FIGURES if k in overall]
    return got[:2] or ["no figure"]


def _fairness(m: dict[str, Any]) -> str:
    cmd = m.get("command")
    if cmd == "bias audit":
        return f"audit {m.get('suite')}: {', '.join(audit_figures(m.get('overall', {})))}, n {m.get('n_items')}"
    if cmd == "bias mitigate" and "method" in m:  # a split run: medians over its splits
        f = m.get("figures", {})

        def med(k: str, fmt: str) -> str:
            return format(f[k]["median"], fmt) if k in f else "?"

        held = m.get("checks", {}).get("ci_contains_50_after_excluded_before", "?")
        end = "" if m.get("complete") else " (stopped)"
        return (f"mitigate {m['method']}, {m.get('splits')}/{m.get('of')} splits{end}: held-out pct "
                f"{med('heldout_pct_before', '.1f')} → {med('heldout_pct_after', '.1f')} (median), "
                f"PPL {med('ppl_increase_pct', '+.2f')}%, CI holds 50 on {held}")
    if cmd == "bias mitigate":
        h = m.get("heldout") or {}
        ppl = m.get("ppl") or {}
        rise = f", PPL {100 * ppl['increase']:+.2f}%" if ppl.get("increase") is not None else ""
        return (f"mitigate {m.get('suite')}: held-out pct {estimate_text(h.get('before', {}).get('pct_stereotype'))} → "
                f"{estimate_text(h.get('after', {}).get('pct_stereotype'))}{rise}")
    return _first_keys(m)


def _first_keys(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in list(m.items())[:4] if not isinstance(v, (dict, list)))


def headline(rec: dict[str, Any]) -> str:
    """A record's main figures in one line (`edge logs`)."""
    m, kind = rec.get("metrics", {}), rec.get("kind")
    with suppress(KeyError, TypeError, ValueError):  # a record from an older edge: its first keys
        if kind == "latency":
            return (f"{m.get('command', '?')}: {m.get('n_gen_tokens', 0)} tok, "
                    f"{m.get('gen_tps', 0):.1f} t/s gen, {m.get('prompt_tps', 0):.1f} t/s prompt, "
                    f"ttft {m.get('ttft_ms', 0):.0f} ms")
        if kind == "fairness":
            return _fairness(m)
        if kind == "eval":
            base = Path(rec.get("config", {}).get("base") or "base").name
            kl = f", KL {m['kld_mean']:.4f} vs {base}" if m.get("kld_mean") is not None else ""
            return f"PPL {m['ppl']:.3f} ± {m['ppl_err']:.3f} ({m['n_scored']} tokens){kl}"
        if kind == "bench":
            tps = ", ".join(f"{k} {m[k + '_tps']:.1f} t/s" for k in ("pp", "tg") if m.get(k + "_tps"))
            hot = ", throttled" if m.get("throttled") else ""
            return f"{m.get('test', '?')}: {tps or 'no figure'}{hot}"
        if kind == "sparsity":
            return (f"{m['sparsity']:.0%} sparse ({m['search']}): KL {m['kl']:.4f} nats/token "
                    f"(uniform {m['uniform_kl']:.4f})")
    return _first_keys(m)


@dataclass
class LogQuery:
    records: list[dict[str, Any]]
    skipped_lines: int


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def read_records(kind: str | None = None, since: datetime | None = None, *,
                 paths: Sequence[str | os.PathLike[str]] | None = None, strict: bool = False) -> LogQuery:
    """Records of `kind` since `since`, oldest first: the one reader of run-log lines.

    From the run log by default, skipping (and counting) lines that do not parse: a crash
    can tear the last line of a shared log. With `paths` (files a user named, e.g. from
    `edge bench --out`) and strict=True, an unreadable file or line is a BadOptionError
    that names it. A record without a kind counts as any kind asked for.
    """
    files = sorted(logs_dir().glob("runs-*.jsonl")) if paths is None else [Path(p) for p in paths]
    out: list[dict[str, Any]] = []
    skipped = 0
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    for path in files:
        for n, line in _lines(path, strict):
            try:
                rec = json.loads(line)
                ts = _parse_ts(rec["ts"]) if "ts" in rec or not strict else None
            except (ValueError, KeyError, TypeError, AttributeError):
                if strict:
                    raise BadOptionError(f"{path} line {n} is not JSON; give a .jsonl file from "
                                         "`edge bench --out` or the run log") from None
                skipped += 1
                continue
            if kind and rec.get("kind", kind) != kind:
                continue
            if since and (ts is None or ts < since):
                continue
            out.append(rec)
    out.sort(key=lambda r: r.get("ts", ""))
    return LogQuery(out, skipped)


def _lines(path: Path, strict: bool) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8", errors="strict" if strict else "replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
    except (OSError, UnicodeDecodeError) as e:
        if not strict:
            return
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BadOptionError(f"cannot read {path} ({why}); give a .jsonl file from `edge bench --out`") from None
