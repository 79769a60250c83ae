"""Bench records to files: JSONL (one telemetry record per line) or a flat CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.errors import BadOptionError
from edge.paths import atomic_write

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

# CSV columns: the figures people sort and plot by, flattened from a record.
CSV_COLUMNS = [
    "ts", "run_id", "model", "quant", "threads", "n_ctx", "test", "n_prompt", "n_gen", "reps",
    "pp_tps", "pp_tps_std", "tg_tps", "tg_tps_std", "ttft_ms", "ttft_ms_std", "load_ms",
    "peak_rss_bytes", "temp_before_c", "temp_after_c", "freq_after_mhz", "throttled",
    "throttled_raw_after", "cooldown_wait_s", "board", "cpu", "hostname",
]


def out_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadOptionError(f"--out {path}: use a .jsonl or .csv file name")
    return fmt


def check_out_path(path: Path) -> None:
    """Fail before a long sweep, not after it, if `path` cannot be written."""
    out_format(path)
    if path.is_dir():
        raise BadOptionError(f"--out {path} is a directory; give a file name such as {path}/bench.jsonl")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BadOptionError(f"--out {path} is not writable ({e.strerror or e}); choose another path") from None


def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    m, model, cfg = rec.get("metrics", {}), rec.get("model") or {}, rec.get("config", {})
    before, after = m.get("state_before") or {}, m.get("state_after") or {}
    dev = rec.get("device") or {}
    row = {k: m.get(k) for k in CSV_COLUMNS if k in m}
    row.update(
        ts=rec.get("ts"), run_id=rec.get("run_id"), model=model.get("name") or model.get("path"),
        quant=model.get("quant"), threads=cfg.get("threads"), n_ctx=cfg.get("n_ctx"),
        temp_before_c=before.get("temp_c"), temp_after_c=after.get("temp_c"),
        freq_after_mhz=after.get("freq_mhz"), throttled_raw_after=after.get("throttled_raw"),
        board=dev.get("board"), cpu=dev.get("cpu"), hostname=dev.get("hostname"),
    )
    return row


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    if out_format(path) == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow(flat_row(r))
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with atomic_write(path, "w") as f:
        f.write(text)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Bench records from a JSONL file (as written by --out, or the run log); a bad line is
    an error that names it (edge.telemetry.read_records, strict)."""
    from edge.telemetry import read_records as read_log

    return [r for r in read_log("bench", paths=[path], strict=True).records if "metrics" in r]
