"""StereoSet (Nadeem et al., 2021): the intrasentence part of dev.json."""

from __future__ import annotations

import json
from pathlib import Path

from bias.suites.base import StereoSetItem, Suite, bad_row, cached, require
from edge.errors import SuiteError

URL = "https://raw.githubusercontent.com/moinnadeem/StereoSet/master/data/dev.json"


def _item(d: dict, row: int) -> StereoSetItem:
    by_label: dict[str, str] = {}
    for s in d["sentences"]:
        by_label[s["gold_label"]] = str(s["sentence"])
    missing = {"stereotype", "anti-stereotype", "unrelated"} - set(by_label)
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))} sentence")
    return StereoSetItem(str(d["id"]), row, str(d["bias_type"]), str(d.get("context", "")),
                         by_label["stereotype"], by_label["anti-stereotype"], by_label["unrelated"])


def load(path: Path | None, *, strict: bool = False) -> Suite:
    path = require(path, "StereoSet dev.json") if path else cached("stereoset_dev.json", URL)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        examples = data["data"]["intrasentence"]
    except (ValueError, KeyError, TypeError) as e:
        raise SuiteError(f"{path}: not a StereoSet dev.json ({type(e).__name__}: {e})") from None
    items: list[StereoSetItem] = []
    skipped: list[int] = []
    for row, d in enumerate(examples):
        try:
            items.append(_item(d, row))
        except (ValueError, KeyError, TypeError) as e:
            # JSON has no useful line numbers here; report the 1-based example number.
            bad_row("StereoSet", path, row + 1, f"example {row + 1}: {e}", strict, skipped)
    return Suite("stereoset", "stereoset", items, str(path), len(skipped), skipped)
