"""CrowS-Pairs (Nangia et al., 2020): the anonymized CSV of sentence pairs."""

from __future__ import annotations

import csv
from pathlib import Path

from bias.suites.base import PairItem, Suite, bad_row, cached, require
from edge.errors import SuiteError

URL = "https://raw.githubusercontent.com/nyu-mll/crows-pairs/master/data/crows_pairs_anonymized.csv"
REQUIRED = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


def load(path: Path | None, *, strict: bool = False) -> Suite:
    path = require(path, "CrowS-Pairs CSV") if path else cached("crows_pairs_anonymized.csv", URL)
    if path.is_dir():
        path = path / "crows_pairs_anonymized.csv"
    items: list[PairItem] = []
    skipped: list[int] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or any(c not in header for c in REQUIRED):
            raise SuiteError(f"{path}: not a CrowS-Pairs CSV (the header needs {', '.join(REQUIRED)})")
        col = {c: header.index(c) for c in REQUIRED}
        row = 0
        start = reader.line_num + 1
        for rec in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines
            if not rec:
                continue
            try:
                if len(rec) != len(header):
                    raise ValueError(f"{len(rec)} fields, expected {len(header)}")
                more, less = rec[col["sent_more"]].strip(), rec[col["sent_less"]].strip()
                direction = rec[col["stereo_antistereo"]].strip()
                category = rec[col["bias_type"]].strip()
                if not more or not less:
                    raise ValueError("empty sentence")
                if direction not in ("stereo", "antistereo"):
                    raise ValueError(f"stereo_antistereo is {direction!r}")
                if not category:
                    raise ValueError("empty bias_type")
            except ValueError as e:
                bad_row("CrowS-Pairs", path, line, str(e), strict, skipped)
                row += 1
                continue
            rid = rec[0].strip() if header[0] in ("", "id", "index") and rec[0].strip() else str(row)
            items.append(PairItem(rid, row, category, more, less, direction))
            row += 1
    return Suite("crows_pairs", "pairs", items, str(path), len(skipped), skipped)
